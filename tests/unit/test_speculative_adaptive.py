"""The adaptive policy: per-request acceptance estimates, the measured step-cost model,
and per-step draft lengths that fall to zero as extra tokens stop paying; the block
manager's rollback of rejected drafts."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from rtpllm.engine.request import Request
from rtpllm.kvcache.block_manager import BlockManager
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative.adaptive import (
    AcceptanceEMA,
    Candidate,
    PolicyConfig,
    SpeculationPolicy,
    StepCostModel,
    draft_values,
)
from rtpllm.speculative.proposer import Proposal, Proposer
from rtpllm.speculative.speculator import Speculator


def test_acceptance_estimate_converges_to_the_geometric_rate() -> None:
    rng = random.Random(0)
    for rate in (0.2, 0.5, 0.9):
        ema = AcceptanceEMA(decay=0.98)
        for _ in range(3000):
            k = 4
            accepted = 0
            while accepted < k and rng.random() < rate:
                accepted += 1
            ema.observe(k, accepted)
        assert ema.rate == pytest.approx(rate, abs=0.08)


def test_cost_model_interpolates_and_never_gets_cheaper_with_tokens() -> None:
    cost = StepCostModel()
    assert cost.seconds(10) is None
    cost.observe(8, 0.010)
    cost.observe(64, 0.050)
    cost.observe(32, 0.005)  # noise: cheaper than 8 tokens
    assert cost.seconds(1) == pytest.approx(0.010)  # below the smallest: its time
    assert cost.seconds(32) == pytest.approx(0.010)  # made monotone
    assert cost.seconds(48) == pytest.approx(0.030)
    assert cost.seconds(128) == pytest.approx(0.100)  # extrapolated per token


def linear_cost(fixed: float, per_token: float, up_to: int = 4096) -> StepCostModel:
    cost = StepCostModel()
    n = 1
    while n <= up_to:
        cost.observe(n, fixed + per_token * n)
        n *= 2
    return cost


def chosen(policy: SpeculationPolicy, batch: int, rate: float, k: int = 4) -> int:
    cands = [Candidate(draft_values(rate, (1.0,) * k)) for _ in range(batch)]
    return sum(policy.allot(cands, batch, batch, max_extra=8192))


def test_k_falls_to_zero_as_the_batch_becomes_compute_bound() -> None:
    # A GPU-like curve: a fixed cost that dominates small batches, then per-token cost.
    policy = SpeculationPolicy(PolicyConfig(max_k=4), linear_cost(fixed=0.010, per_token=0.0001))
    per_request = [chosen(policy, b, 0.6) / b for b in (1, 8, 64, 256, 1024)]
    assert per_request[0] == 4  # memory-bound: every draft is nearly free
    assert per_request == sorted(per_request, reverse=True)
    assert per_request[-1] == 0  # compute-bound: none pays


def test_low_acceptance_gets_fewer_drafts_than_high() -> None:
    policy = SpeculationPolicy(PolicyConfig(max_k=4), linear_cost(fixed=0.010, per_token=0.0001))
    assert chosen(policy, 64, 0.2) < chosen(policy, 64, 0.9)


def test_without_measurements_everything_is_tried_and_non_adaptive_takes_all() -> None:
    cands = [Candidate(draft_values(0.5, (1.0,) * 3)) for _ in range(4)]
    assert SpeculationPolicy(PolicyConfig(max_k=4), StepCostModel()).allot(cands, 4, 4, 100) == [3, 3, 3, 3]
    expensive = linear_cost(fixed=0.0, per_token=1.0)
    assert SpeculationPolicy(PolicyConfig(max_k=2, adaptive=False), expensive).allot(cands, 4, 4, 100) == [2, 2, 2, 2]
    assert SpeculationPolicy(PolicyConfig(max_k=2, adaptive=True), expensive).allot(cands, 4, 4, 100) == [0, 0, 0, 0]


def test_the_token_budget_caps_drafts() -> None:
    cands = [Candidate(draft_values(0.9, (1.0,) * 4)) for _ in range(4)]
    counts = SpeculationPolicy(PolicyConfig(max_k=4), StepCostModel()).allot(cands, 4, 4, max_extra=6)
    assert sum(counts) == 6


def test_draft_values_take_the_smaller_estimate() -> None:
    assert draft_values(0.5, (1.0, 1.0)) == [0.5, 0.25]
    assert draft_values(0.9, (0.5, 0.5)) == [0.5, 0.25]


def test_truncate_frees_only_uncommitted_tail_blocks() -> None:
    class Req:
        def __init__(self, tokens: list[int]) -> None:
            self.request_id = "r"
            self.all_token_ids = tokens

    bm = BlockManager(8, 4, b"ns")
    req = Req(list(range(6)))
    assert bm.allocate(req, 6 + 6)  # 6 tokens and 6 drafts: 3 blocks
    assert len(bm.block_table("r")) == 3
    bm.commit(req, 4)  # the first block is full and accepted
    assert bm.truncate("r", 7) == 1  # 7 tokens need 2 blocks
    assert len(bm.block_table("r")) == 2 and bm.num_free_blocks == 6
    assert bm.truncate("r", 1) == 1  # never below the committed block
    assert len(bm.block_table("r")) == 1
    bm.check_invariants({"r"})
    assert len(bm.cached_keys()) == 1


class _FixedProposer(Proposer):
    """Always proposes the same four tokens."""

    def propose(self, request_id: str, tokens: Sequence[int], k: int, private: bool = False) -> Proposal:
        return Proposal(tokens=(1, 2, 3, 4)[:k], confidence=(1.0,) * min(k, 4))

    def forget(self, request_id: str, output_tokens: Sequence[int] | None = None) -> None:
        pass


def test_a_request_that_stopped_drafting_tries_again_and_re_plans_back_off() -> None:
    """Once a plan chooses nothing, steps stay asynchronous and plan only now and then:
    first after probe_every steps, then, while the policy keeps choosing nothing, after
    twice as many each time (up to probe_every * 2**MAX_BACKOFF), each re-plan exploring
    with the most promising request. A request's idle time counts steps, not plans, so
    one whose drafts were all rejected is optimistic again once idle probe_every steps."""
    spec = Speculator(_FixedProposer(), PolicyConfig(max_k=4), probe_every=16)
    req = Request("r", list(range(8)), SamplingParams(temperature=0, max_tokens=10_000), max_model_len=20_000)
    req.num_computed_tokens = len(req.prompt_token_ids)
    # Verify steps measured at 3x a plain one: drafts do not pay at a = 0.5.
    for _ in range(9):
        spec.observe_step(1, 0.010)
        spec.observe_step(5, 0.030)
    assert spec.plan([req], base_tokens=1, max_extra=16) == {}
    drafted_at = []
    for step in range(1, 1200):
        if spec.wants_step([req]) and (drafts := spec.plan([req], base_tokens=1, max_extra=16)):
            drafted_at.append(step)
            spec.observe_verified(req, len(drafts["r"]), 0)
    gaps = [b - a for a, b in zip([0, *drafted_at], drafted_at, strict=False)]
    assert gaps[:6] == [16, 33, 65, 129, 257, 257], gaps  # each explore's own plan, then the wait
    # Cheap verify steps now (graphs): the request, idle for probe_every steps, is
    # optimistic again (a >= 0.5) though its drafts were all rejected, and the
    # policy's own choice resets the back-off.
    for _ in range(9):
        spec.observe_step(5, 0.011)
    chose = [step for step in range(1, 300) if spec.wants_step([req]) and spec.plan([req], base_tokens=1, max_extra=16)]
    assert chose and chose[0] <= 257 and len(chose) > 3 and chose[1] - chose[0] == 1, chose


def test_no_drafts_when_they_lose_to_pipelined_steps() -> None:
    """Drafting nothing returns a batch to pipelined (asynchronous) steps, so drafts are
    weighed against those: with synchronous 64-token steps at 12 ms, 160-token verify
    steps at 15 ms and pipelined 64-token steps at 8 ms, drafts of value 0.3 lose
    (64 + 29 tokens in 15 ms against 64 in 8), though against a synchronous plain step
    they would seem to win (64 in 12 ms)."""
    sync, pipelined = StepCostModel(), StepCostModel()
    for _ in range(5):
        sync.observe(64, 0.012)
        sync.observe(160, 0.015)
        pipelined.observe(64, 0.008)
    cands = [Candidate([0.3, 0.09, 0.03]) for _ in range(64)]
    assert sum(SpeculationPolicy(PolicyConfig(), sync).allot(cands, 64, 64, 1000)) > 0
    assert sum(SpeculationPolicy(PolicyConfig(), sync, pipelined).allot(cands, 64, 64, 1000)) == 0
