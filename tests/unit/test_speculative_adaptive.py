"""The adaptive policy: per-request acceptance estimates, the measured step-cost model,
and per-step draft lengths that fall to zero as extra tokens stop paying; the block
manager's rollback of rejected drafts."""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

import pytest

from rtpllm.engine.request import Request
from rtpllm.kvcache.block_manager import BlockManager
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative.adaptive import (
    POOL_MAX_TRIALS,
    POOL_MIN_REQUESTS,
    SETTLED,
    AcceptanceEMA,
    Candidate,
    PolicyConfig,
    RecentAcceptance,
    SpeculationPolicy,
    StepCostModel,
    draft_values,
    pooling_weight,
)
from rtpllm.speculative.proposer import Proposal, Proposer
from rtpllm.speculative.speculator import MARGINAL_GAIN, SMALL_BATCH, Speculator


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
    cost.observe(32, 0.005)  # cheaper than 8 tokens: the 8-token price is the likelier error
    assert cost.seconds(1) == pytest.approx(0.005)  # below the smallest: its (monotone) time
    assert cost.seconds(8) == pytest.approx(0.005)  # made monotone from the largest down
    assert cost.seconds(32) == pytest.approx(0.005)
    assert cost.seconds(48) == pytest.approx(0.0275)
    assert cost.seconds(128) == pytest.approx(0.140)  # the last segment's slope, 0.045 s per 32 tokens
    one = StepCostModel()
    one.observe(64, 0.050)
    # One point: its own time above it (in proportion to tokens, a warm-up's one 2-token
    # verify step priced k = 4 at 2.5x and held an H100 batch at k = 1 for good).
    assert one.seconds(128) == pytest.approx(0.050)


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


def decoding(request_id: str) -> Request:
    req = Request(request_id, list(range(8)), SamplingParams(temperature=0, max_tokens=100_000), max_model_len=200_000)
    req.num_computed_tokens = len(req.prompt_token_ids)
    return req


def test_a_request_that_stopped_drafting_tries_again_and_re_plans_back_off() -> None:
    """Once a plan chooses nothing, steps stay asynchronous and plan only now and then:
    first after probe_every steps, then, while the policy keeps choosing nothing, after
    twice as many each time (up to probe_every * 2**MAX_BACKOFF). A re-plan (and the
    first plan of all) explores a verify size only while its cost is unmeasured,
    unsettled (fewer than SETTLED steps) or stale (measured more than
    explore_stale_steps ago), the smallest first. A request's idle time counts steps, not
    plans, so one whose drafts were all rejected is optimistic again once idle
    probe_every steps."""
    spec = Speculator(_FixedProposer(), PolicyConfig(max_k=4), probe_every=16)
    req = decoding("r")
    # Verify steps of 5 tokens measured at 3x a pipelined one: drafts do not pay at a = 0.5.
    for _ in range(9):
        spec.observe_step(1, 0.010, pipelined=True)
        spec.observe_step(5, 0.030)
    # The first plan of all explores the unmeasured 2-token size (one draft).
    assert spec.plan([req], base_tokens=1, max_extra=4) == {"r": (1,)}
    spec.observe_verified(req, 1, 0)
    spec.observe_step(2, 0.030)
    replans, declined, drafted = [], [], []
    for step in range(1, 1100):
        drafts = {}
        before = spec.counters.prechecked_plans
        if spec.wants_step([req]):
            replans.append(step)
            drafts = spec.plan([req], base_tokens=1, max_extra=4)
        if spec.counters.prechecked_plans > before:
            declined.append(step)
        if drafts:
            drafted.append((step, len(drafts["r"])))
            spec.observe_verified(req, len(drafts["r"]), 0)
            spec.observe_step(1 + len(drafts["r"]), 0.030)
        else:
            spec.observe_step(1, 0.010, pipelined=True)
    # The 2-token size is explored until settled (SETTLED = 3 steps: the first plan, 33,
    # 98), each exploration followed by a plan that declines, and the waits double (the
    # spells did not pay). At 227 it is settled and fresh, and the 4- and 8-token sizes
    # cannot pay by what 2 tokens cost: no exploration. At 483 it is stale and explored
    # again, at 740 fresh, at 996 stale again. Every re-plan that would decline is
    # decided in wants_step, from the estimates, without the synchronous step a plan
    # needs: only the explorations plan.
    assert replans == [33, 98, 483, 996], replans
    assert declined == [1, 34, 99, 227, 484, 740, 997], declined
    assert drafted == [(33, 1), (98, 1), (483, 1), (996, 1)], drafted
    # Cheap verify steps now (graphs): the request, idle for probe_every steps, is
    # optimistic again (a >= 0.5) though its drafts were all rejected, and the
    # policy's own choice resets the back-off.
    for _ in range(9):
        spec.observe_step(2, 0.0105)
        spec.observe_step(5, 0.011)
    chose = [step for step in range(1, 300) if spec.wants_step([req]) and spec.plan([req], base_tokens=1, max_extra=4)]
    assert chose and chose[0] <= 257 and len(chose) > 3 and chose[1] - chose[0] == 1, chose


def test_a_re_plan_declined_without_a_step_is_one_the_plan_would_decline() -> None:
    """`wants_step` skips the synchronous step of a plan it can tell, from the estimates
    alone, would draft nothing. Over random batches, acceptance histories and step
    costs, whenever it says so, the plan (run on an identical copy) indeed drafts
    nothing; and the check does decline some of them. The check runs with every
    request's last token in flight (async scheduling), the plan after it resolved."""
    rng = random.Random(5)
    declined = agreed = 0
    for _ in range(300):
        spec = Speculator(_FixedProposer(), PolicyConfig(max_k=4), probe_every=4)
        batch = rng.choice([1, 4, 16, 64])
        reqs = [decoding(f"r{i}") for i in range(batch)]
        plain, per_token = rng.uniform(0.005, 0.02), rng.uniform(0.0, 0.0005)
        for _ in range(9):
            spec.observe_step(batch, plain, pipelined=True)
            for extra in (1, batch, 4 * batch):
                spec.observe_step(batch + extra, plain * rng.uniform(1.0, 1.5) + per_token * extra)
        spec.plan(reqs, base_tokens=batch, max_extra=4 * batch)
        rate = rng.random()
        for req in reqs:  # a history of verifications at this acceptance
            for _ in range(rng.randint(0, 6)):
                n = 4
                accepted = next((j for j in range(n) if rng.random() > rate), n)
                spec.observe_verified(req, n, accepted)
        spec._steps_without = rng.choice([0, 1, 2])
        twin = copy.deepcopy(spec)
        for req in reqs:
            req.append_placeholder()
        could = spec._could_draft(reqs)
        for req in reqs:
            req.resolve_placeholder(7)
        if not could:
            declined += 1
            agreed += not twin.plan(reqs, base_tokens=batch, max_extra=4 * batch)
    assert declined > 30 and agreed == declined, (declined, agreed)


def test_the_check_runs_where_it_is_cheap_or_the_spell_uncertain() -> None:
    """The check costs host time in a synchronous step. A spell drafting on estimates
    that clearly pay (>= MARGINAL_GAIN) skips it; a marginal one runs it at a small
    batch only (at batch 64 it would cost every step of the spell); after a step that
    drafted on hope (an exploration, a retry) it runs at any batch."""
    for batch in (8, 64):
        spec = Speculator(_FixedProposer(), PolicyConfig(max_k=4), probe_every=16)
        reqs = [decoding(f"r{i}") for i in range(batch)]
        for _ in range(9):
            spec.observe_step(batch, 0.010, pipelined=True)
            for extra in (1, batch, 2 * batch, 4 * batch):
                spec.observe_step(batch + extra, 0.0101)  # drafts nearly free
        calls = []
        real = spec._could_draft
        spec._could_draft = lambda running, calls=calls, real=real: calls.append(1) or real(running)  # type: ignore[method-assign]
        assert spec.plan(reqs, base_tokens=batch, max_extra=4 * batch) and spec._last_gain >= MARGINAL_GAIN
        assert spec.policy.on_estimates
        assert spec.wants_step(reqs) and not calls
        spec._last_gain = 1.05
        assert spec.wants_step(reqs) and calls == ([1] if batch <= SMALL_BATCH else [])
        spec.policy.on_estimates = False  # as after an exploration or a retry
        assert spec.wants_step(reqs) and len(calls) == (2 if batch <= SMALL_BATCH else 1)


def test_exploration_goes_one_size_at_a_time_and_stops_where_drafts_cannot_pay() -> None:
    """At batch 64, with only pipelined 64-token steps measured after a first verify
    step: a re-plan explores 128 tokens (each request's best draft), not the whole
    batch's drafts; once 128 is measured at a cost that even every draft up to 256
    tokens could not repay, nothing bigger is explored until 128 goes stale."""
    policy = SpeculationPolicy(PolicyConfig(max_k=4), StepCostModel(), StepCostModel())
    assert policy.pipelined is not None
    for _ in range(5):
        policy.pipelined.observe(64, 0.0075, at=10)
    cands = [Candidate(draft_values(0.3, (1.0,) * 4)) for _ in range(64)]
    first = policy.explore(cands, 64, 64, 1000, fresh_since=0)
    assert first == [1] * 64  # 128 tokens: the smallest unmeasured size
    policy.cost.observe(128, 0.012, at=20)  # 64 + 19 tokens in 12 ms against 64 in 7.5
    assert policy.allot(cands, 64, 64, 1000) == [0] * 64
    # One step is not a settled cost (SETTLED): 128 is explored until it is.
    assert policy.explore(cands, 64, 64, 1000, fresh_since=0) == [1] * 64
    for _ in range(SETTLED - 1):
        policy.cost.observe(128, 0.012, at=20)
    assert policy.explore(cands, 64, 64, 1000, fresh_since=0) == [0] * 64
    # At a = 0.7 the 256-token size could pay: it is explored next.
    rich = [Candidate(draft_values(0.7, (1.0,) * 4)) for _ in range(64)]
    assert sum(policy.explore(rich, 64, 64, 1000, fresh_since=0)) == 192
    # 128 measured long ago: explored again.
    assert policy.explore(cands, 64, 64, 1000, fresh_since=21) == [1] * 64


def test_a_step_without_drafts_is_never_priced_from_bigger_steps() -> None:
    """Below its smallest measurement a cost model answers with that measurement, so a
    plain step priced from verify steps alone would look as dear as one, and every draft
    free. With verify steps measured and plain ones not, the policy drafts nothing (which
    measures a plain step); with nothing measured at all it drafts everything."""
    cands = [Candidate(draft_values(0.3, (1.0,) * 4)) for _ in range(64)]
    policy = SpeculationPolicy(PolicyConfig(max_k=4), StepCostModel(), StepCostModel())
    assert sum(policy.allot(cands, 64, 64, 1000)) == 64 * 2  # values >= min_value
    policy.cost.observe(192, 0.013)
    assert policy.pipelined is not None
    policy.pipelined.observe(2048, 0.060)  # a prefill chunk
    assert policy.allot(cands, 64, 64, 1000) == [0] * 64
    policy.pipelined.observe(64, 0.0075)
    assert policy.allot(cands, 64, 64, 1000) == [0] * 64  # (64 + 24) / 13 ms < 64 / 7.5 ms
    policy.cost.observe(192, 0.008)
    policy.cost.observe(192, 0.008)  # now the median: drafts pay
    assert sum(policy.allot(cands, 64, 64, 1000)) > 0


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


def test_a_batch_far_smaller_than_any_measured_plain_step_measures_one_and_re_plans_at_once() -> None:
    """A batch that shrank to under a quarter of every plain step measured is not priced
    from them: the plan drafts nothing, and the next plan comes as soon as a pipelined
    step of the new size is timed (the step after the restart), not probe_every steps
    later. One that shrank less is priced from the size it shrank from."""
    spec = Speculator(_FixedProposer(), PolicyConfig(max_k=4), probe_every=16)
    for _ in range(5):
        spec.observe_step(64, 0.0075, pipelined=True)
        spec.observe_step(320, 0.0148)
    reqs = [decoding(f"r{i}") for i in range(8)]
    spec.plan(reqs[:5] * 4, base_tokens=20, max_extra=1000)
    assert not spec.policy.measuring_plain
    assert spec.plan(reqs, base_tokens=8, max_extra=1000) == {}
    assert spec.policy.measuring_plain
    spec.observe_step(8, None, pipelined=True)  # the restart: not timed
    assert not spec.wants_step(reqs)
    spec.observe_step(8, 0.0070, pipelined=True)
    assert spec.wants_step(reqs)
    spec.plan(reqs, base_tokens=8, max_extra=1000)
    assert not spec.policy.measuring_plain


def test_a_request_leans_on_the_others_recent_acceptance_until_it_has_its_own() -> None:
    recent = RecentAcceptance()
    mine, other = AcceptanceEMA(), AcceptanceEMA()
    assert mine.rate_given(recent.rate_without(mine)) == pytest.approx(0.5)  # nothing known: even
    for _ in range(40):  # the other request: 3 of 4 drafts accepted, then a rejection
        other.observe(4, 3)
        recent.observe(other, 4, 3)
    assert recent.rate_without(mine) == pytest.approx(0.75, abs=0.03)
    assert mine.rate_given(recent.rate_without(mine)) == pytest.approx(0.75, abs=0.03)
    # Its own rejections lower its estimate, not its prior (at batch 1, a prior that
    # counted them twice stopped a request at A = 0.7 after two misses).
    for _ in range(2):
        mine.observe(4, 0)
        recent.observe(mine, 4, 0)
    assert recent.rate_without(mine) == pytest.approx(0.75, abs=0.03)
    assert recent.rate_without(other) < 0.75
    low = mine.rate_given(recent.rate_without(mine))
    assert 0.3 < low < 0.6
    for _ in range(30):  # evidence of its own outweighs the prior
        mine.observe(4, 0)
        recent.observe(mine, 4, 0)
    assert mine.rate_given(recent.rate_without(mine)) < 0.05
    mine.restart()  # a retry: the prior whole again, its own share still left out of it
    assert mine.rate_given(recent.rate_without(mine)) == pytest.approx(0.75, abs=0.05)


def _verified(rng: random.Random, rate: float, times: int) -> AcceptanceEMA:
    ema = AcceptanceEMA()
    for _ in range(times):
        accepted = 0
        while accepted < 4 and rng.random() < rate:
            accepted += 1
        ema.observe(4, accepted)
    return ema


def test_requests_lean_on_each_other_as_much_as_they_are_alike() -> None:
    """The prior's lasting weight (`pooling_weight`) is large for a batch whose requests
    share one acceptance (their estimates differ by luck alone), about none for one whose
    requests differ, and none for too few requests to tell; a request's estimate keeps
    that weight on its prior."""
    rng = random.Random(3)
    alike = [_verified(rng, 0.5, 30) for _ in range(64)]
    differ = [_verified(rng, 0.9 if i % 2 else 0.1, 30) for i in range(64)]
    full = POOL_MAX_TRIALS * (1 - alike[0].decay)
    assert pooling_weight(alike) >= 0.5 * full
    assert pooling_weight(differ) <= 0.15 * full  # about one trial: a beta prior over rates this far apart
    assert pooling_weight(alike[: POOL_MIN_REQUESTS - 1]) == 0.0
    # One unlucky request among alike ones is pulled toward the batch's rate.
    unlucky = AcceptanceEMA()
    for _ in range(30):
        unlucky.observe(4, 0)
    assert unlucky.rate_given(0.5) < 0.05
    assert unlucky.rate_given(0.5, pooling_weight(alike)) > 0.25


def test_the_cost_curve_follows_new_observations() -> None:
    cost = StepCostModel()
    cost.observe(8, 0.010)
    cost.observe(64, 0.050)
    assert cost.seconds(36) == pytest.approx(0.030)
    for _ in range(9):  # the 64 bucket's median moves: the cached curve with it
        cost.observe(64, 0.030)
    assert cost.seconds(36) == pytest.approx(0.020)


def test_a_step_goes_at_most_one_doubling_past_what_was_measured() -> None:
    """Past the largest measured size a step is priced on a guess (flat from one
    measurement): the allotment goes no further than twice that size, or twice the
    batch's own, so a compute-bound machine pays for one guess of 2x, not 5x."""
    sync, pipelined = StepCostModel(), StepCostModel()
    sync.observe(2, 0.006)  # a warm-up's 2-token verify step
    pipelined.observe(64, 0.007)
    policy = SpeculationPolicy(PolicyConfig(max_k=4), sync, pipelined)
    counts = policy.allot([Candidate([0.9, 0.8, 0.7, 0.6]) for _ in range(64)], 64, 64, 1 << 16)
    assert sum(counts) == 64  # 128 tokens: twice the batch's bucket
    sync.observe(128, 0.009)
    counts = policy.allot([Candidate([0.9, 0.8, 0.7, 0.6]) for _ in range(64)], 64, 64, 1 << 16)
    assert sum(counts) == 192  # now up to 256 tokens


def test_a_lull_clears_the_re_plan_wait() -> None:
    """Once the last request that could speculate leaves, the next ones are planned at
    their first decode step, as by a fresh engine, not after the re-plan wait (and its
    back-off) that the batch before them ran up; while any request stays, the wait holds.
    What was measured stays: a plan is still priced by the step costs seen."""

    def backed_off() -> tuple[Speculator, Request]:
        spec = Speculator(_FixedProposer(), PolicyConfig(max_k=4), probe_every=16)
        old = decoding("old")
        # Drafts do not pay: verify steps at 3x a pipelined one, every draft rejected.
        for _ in range(9):
            spec.observe_step(1, 0.010, pipelined=True)
            spec.observe_step(5, 0.030)
        for _ in range(200):
            drafts = spec.plan([old], base_tokens=1, max_extra=4) if spec.wants_step([old]) else {}
            if drafts:
                spec.observe_verified(old, len(drafts["old"]), 0)
            spec.observe_step(1 + len(drafts.get("old", ())), 0.030 if drafts else 0.010, pipelined=not drafts)
        # Now drafts pay (cheap verify steps): only the wait keeps a plan away.
        for _ in range(9):
            spec.observe_step(1, 0.010, pipelined=True)
            spec.observe_step(5, 0.0101)
        return spec, old

    def first_plan(spec: Speculator, reqs: list[Request]) -> int:
        return next(step for step in range(1, 600) if spec.wants_step(reqs))

    spec, old = backed_off()
    assert first_plan(spec, [old, decoding("new")]) > 16  # the old request stays: the wait holds
    spec, old = backed_off()
    old.finish_reason = "stop"
    spec.forget(old)
    new = decoding("new")
    assert first_plan(spec, [new]) == 1
    # It drafts, though short: its prior is the recent acceptance (every draft rejected).
    assert spec.plan([new], base_tokens=1, max_extra=4) == {"new": (1,)}
