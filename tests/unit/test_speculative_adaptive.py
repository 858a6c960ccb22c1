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


def test_a_request_that_stopped_drafting_tries_again_within_probe_every_steps() -> None:
    """Once a plan chooses nothing, steps stay asynchronous and plan only every
    `probe_every` steps: a request's idle time counts those steps (not the plans), and
    each such re-plan explores, so a request whose early drafts were rejected (or
    whose step size looked costly once) speculates again within probe_every steps,
    not probe_every plans (probe_every^2 steps, past most requests' ends)."""
    spec = Speculator(_FixedProposer(), PolicyConfig(max_k=4), probe_every=16)
    req = Request("r", list(range(8)), SamplingParams(temperature=0, max_tokens=1000), max_model_len=4096)
    req.num_computed_tokens = len(req.prompt_token_ids)
    # Verify steps once measured at 3x a plain one: drafts do not pay at a = 0.5.
    for _ in range(9):
        spec.observe_step(1, 0.010)
        spec.observe_step(5, 0.030)
    assert spec.plan([req], base_tokens=1, max_extra=16) == {}
    drafted_at = []
    for step in range(1, 60):
        if spec.wants_step([req]) and (drafts := spec.plan([req], base_tokens=1, max_extra=16)):
            drafted_at.append(step)
            spec.observe_verified(req, len(drafts["r"]), 0)
    assert drafted_at and drafted_at[0] <= 16, drafted_at
    assert len(drafted_at) >= 3 and all(b - a <= 17 for a, b in zip(drafted_at, drafted_at[1:], strict=False)), drafted_at
    # Cheap verify steps now (graphs): the request, idle for probe_every steps, is
    # optimistic again (a >= 0.5) though its last drafts were all rejected.
    for _ in range(9):
        spec.observe_step(5, 0.011)
    for _ in range(17):
        if spec.wants_step([req]):
            spec.plan([req], base_tokens=1, max_extra=16)
    assert spec.wants_step([req]) or spec.plan([req], base_tokens=1, max_extra=16)
