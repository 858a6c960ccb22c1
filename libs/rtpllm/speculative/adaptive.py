"""How many draft tokens each request verifies in a step: per request from its measured
acceptance, per step from what extra tokens cost on this machine.

- Per request, acceptance is modelled as geometric: each draft token is right with
  probability a, given the ones before it were. `AcceptanceEMA` keeps exponential
  moving averages of accepted tokens and of rejections; a = accepted / (accepted +
  rejections) is the estimator that fits that model (a run of j accepted then a
  rejection, or j accepted with the drafts exhausted).
- Per step, `StepCostModel` holds the measured step time as a function of the tokens
  in the batch (online: every step's time goes in, the median of recent steps per
  bucket of sizes), one for steps that plan drafts (synchronous) and one for pipelined
  steps (async scheduling), which price the no-draft alternative. `SpeculationPolicy.allot` adds draft
  tokens in order of their expected value (the chance they are accepted) while that
  raises the expected tokens emitted per second of step time. On a memory-bound GPU a
  few hundred tokens cost about what one does, so drafts are nearly free; when the
  batch is compute-bound every token costs its share and drafts must be likely to pay,
  so k falls, down to 0 (no speculation, and the step keeps async scheduling).
- A proposer that runs a model (a draft model) costs time of its own: one batched pass
  per draft position over the requests drafting that far. `PassCost` adds those passes,
  from the proposer's own measured pass times, to the step time the allotment weighs,
  so a draft is taken only when it pays for its share of the target step and of the
  draft passes both.
- A size the policy avoids is never measured again, and the model prices unmeasured
  sizes from the neighbours it has (flat below the smallest, along the last segment
  above the largest), which on a GPU overprices many of them. So a re-plan that chooses
  nothing may explore (`SpeculationPolicy.explore`): the smallest size whose cost is
  unmeasured or stale, reached with the best drafts only, and only if that size could
  pay at all given what smaller steps are known to cost.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

# A plain step is priced from pipelined steps of at most this many times its bucket's
# size (StepCostModel.covers): a batch that shrank a little costs about what it did on a
# memory-bound GPU, while a prefill chunk would make every draft look free.
COVER_FACTOR = 4
# A bucket's cost is settled after this many steps: before, one slow step (the first of
# its size in a process, a neighbour's load) is its median, and a size priced too high
# is never chosen again. Exploration re-measures unsettled sizes, and a floor is taken
# only from settled ones. (The 1.5B shape's warm-up timed one 2-token verify step at 3.57
# ms on the H100, twice a pipelined step; on that alone batch 1 never drafted.)
SETTLED = 3


@dataclass
class AcceptanceEMA:
    """Per-request acceptance estimate (see the module docstring). The estimate starts
    at a prior worth two observations, which fades as observations come in (by `decay`
    each, as they do): `rate_given(prior)` takes the prior's rate when asked, so a request
    with little evidence of its own leans on what the proposer achieves for the others
    now, not on what it achieved when the request arrived."""

    decay: float = 0.8
    accepted: float = 0.0  # the observations' part of the averages
    rejected: float = 0.0
    fade: float = 1.0  # what is left of the prior's weight: decay ** observations
    steps_idle: int = 0  # steps since the request last verified a draft
    # Its share of RecentAcceptance's counts (as of that one's clock), which its prior
    # leaves out.
    own_accepted: float = 0.0
    own_rejected: float = 0.0
    clock: int = 0

    PRIOR_WEIGHT = 2.0

    def rate_given(self, prior: float, floor: float = 0.0) -> float:
        """The estimate under a prior of rate `prior`, whose weight fades with the
        request's own evidence but not below `floor` (`pooling_weight`)."""
        w = max(self.PRIOR_WEIGHT * self.fade, floor)
        return (self.accepted + w * prior) / (self.accepted + self.rejected + w)

    @property
    def rate(self) -> float:
        """The estimate under an even prior (a = 0.5)."""
        return self.rate_given(0.5)

    def restart(self) -> None:
        """Drop the evidence (a retry: see the Speculator); the prior is whole again."""
        self.accepted = self.rejected = 0.0
        self.fade = 1.0

    def observe(self, num_proposed: int, num_accepted: int) -> None:
        d = self.decay
        self.accepted = d * self.accepted + (1 - d) * num_accepted
        self.rejected = d * self.rejected + (1 - d) * (1.0 if num_accepted < num_proposed else 0.0)
        self.fade *= d
        self.steps_idle = 0


# `pooling_weight`: requests with evidence needed to judge how alike they are, the least
# evidence (Bernoulli trials) a request needs to count, and the bounds of the prior's
# weight in trials (10 trials = PRIOR_WEIGHT at decay 0.8: what a new request starts with).
POOL_MIN_REQUESTS = 8
POOL_MIN_TRIALS = 2.0
POOL_MAX_TRIALS = 10.0


def pooling_weight(estimates: Sequence[AcceptanceEMA]) -> float:
    """How much weight every request's prior keeps for good, in its EMA's units: large
    when the batch's requests look alike, none when they differ.

    A request's EMA holds about 1 / (1 - decay) verifications, so its own rate swings
    with luck. Allotting drafts by those swings gives them to the lucky requests and
    leaves the unlucky ones decoding a token a step into a closed batch's tail: on an
    H100 at batch 64 and A = 0.5 (every request alike) the run came out at 0.90x
    (2026-12-06, session 7). Where requests do differ (code edits beside chat), pooling
    them would hide it. So the weight is an empirical-Bayes one: a beta prior's weight,
    in trials, is p (1 - p) / tau^2 - 1, with tau^2 the variance of the requests' true
    rates, estimated by moments from how far their observed rates spread beyond what
    their evidence explains. Too few requests with evidence: 0 (the prior fades as
    before)."""
    trials, rates = [], []
    for ema in estimates:
        total = ema.accepted + ema.rejected
        n = total / (1.0 - ema.decay)  # the EMA's (1 - decay)-weighted counts, as trials
        if n >= POOL_MIN_TRIALS:
            trials.append(n)
            rates.append(ema.accepted / total)
    if len(trials) < POOL_MIN_REQUESTS:
        return 0.0
    n_sum = sum(trials)
    p = sum(n * r for n, r in zip(trials, rates, strict=True)) / n_sum
    var_p = p * (1.0 - p)
    if var_p <= 0.0:
        return 0.0
    spread = sum(n * (r - p) ** 2 for n, r in zip(trials, rates, strict=True))
    tau2 = (spread - (len(trials) - 1) * var_p) / (n_sum - sum(n * n for n in trials) / n_sum)
    m = POOL_MAX_TRIALS if tau2 <= 0.0 else min(max(var_p / tau2 - 1.0, 0.0), POOL_MAX_TRIALS)
    return m * (1.0 - estimates[0].decay)


@dataclass
class RecentAcceptance:
    """Acceptance of the recent verifications of all requests together: decayed counts
    (by `decay` per verification, about the last 1 / (1 - decay)). A request's prior
    (`AcceptanceEMA.rate_given`) is `rate_without` it: the others' recent acceptance, under
    an even prior worth two. Without its own, since at a small batch the recent
    verifications are mostly the request's, and counting them in its prior as well as
    in its estimate made two early rejections stop it for good."""

    decay: float = 0.99
    accepted: float = 0.0
    rejected: float = 0.0
    clock: int = 0  # verifications so far

    def rate_without(self, own: AcceptanceEMA) -> float:
        fade = self.decay ** (self.clock - own.clock)
        accepted = max(self.accepted - own.own_accepted * fade, 0.0)
        rejected = max(self.rejected - own.own_rejected * fade, 0.0)
        return (accepted + 1.0) / (accepted + rejected + 2.0)

    def observe(self, own: AcceptanceEMA, num_proposed: int, num_accepted: int) -> None:
        """A verification of the request `own` estimates (which keeps its share)."""
        d = self.decay
        rejected = 1.0 if num_accepted < num_proposed else 0.0
        self.accepted = d * self.accepted + num_accepted
        self.rejected = d * self.rejected + rejected
        self.clock += 1
        fade = d ** (self.clock - own.clock)
        own.own_accepted = own.own_accepted * fade + num_accepted
        own.own_rejected = own.own_rejected * fade + rejected
        own.clock = self.clock


class StepCostModel:
    """Step seconds as a function of tokens in the batch, measured on the running
    machine: per power-of-two bucket of token counts, the median of its last steps,
    interpolated linearly between measured buckets. Sizes above the largest measurement
    extrapolate along the last segment (from a single measurement, its time); below the
    smallest, the smallest's time (a step never costs less than a smaller one)."""

    def __init__(self, window: int = 9) -> None:
        # The median of a bucket's last `window` steps: a step slowed by something else
        # (a collection, a neighbour on the host) must not make its size look costly
        # for long, since the policy then avoids that size and would not re-measure it.
        self.window = window
        self._sizes: list[int] = []  # bucket sizes, sorted
        self._obs: dict[int, deque[tuple[int, float]]] = {}  # bucket -> (tokens, seconds)
        self._last: dict[int, int] = {}  # bucket -> the caller's step count at its newest observation
        # The curve `seconds` reads (`_monotone`), rebuilt only after an observation. An
        # allotment prices hundreds of sizes in a synchronous step's host time (at batch
        # 64, 4.3 ms on a CPU core when each price took every bucket's median afresh).
        self._curve: list[tuple[float, float]] | None = None

    @property
    def num_buckets(self) -> int:
        return len(self._sizes)

    @staticmethod
    def bucket(num_tokens: int) -> int:
        """The bucket holding `num_tokens`: the power of two at or above it (sizes in (b/2, b])."""
        return 1 << max(num_tokens - 1, 0).bit_length()

    def observe(self, num_tokens: int, seconds: float, at: int = 0) -> None:
        """A step of `num_tokens` took `seconds`; `at`: the caller's step count (for `measured_since`)."""
        if num_tokens <= 0 or seconds <= 0:
            return
        bucket = self.bucket(num_tokens)
        if bucket not in self._obs:
            bisect.insort(self._sizes, bucket)
            self._obs[bucket] = deque(maxlen=self.window)
        self._obs[bucket].append((num_tokens, seconds))
        self._last[bucket] = at
        self._curve = None

    def reach(self, num_tokens: int) -> int:
        """The most tokens a step may take on this model's prices, for a step of at least
        `num_tokens`: twice the bucket of the largest measured step or of `num_tokens`."""
        return 2 * max(self._sizes[-1] if self._sizes else 0, self.bucket(num_tokens))

    def covers(self, num_tokens: int, factor: int = 1) -> bool:
        """Whether this model measured a step of at most `factor` times the bucket of
        `num_tokens` (so `seconds` does not price it from much bigger steps alone)."""
        return bool(self._sizes) and self._sizes[0] <= factor * self.bucket(num_tokens)

    def measured_since(self, num_tokens: int, step: int) -> bool:
        """Whether the bucket of `num_tokens` is settled (SETTLED observations or more)
        with one made at `step` or later."""
        bucket = self.bucket(num_tokens)
        last = self._last.get(bucket)
        return last is not None and last >= step and self._settled(bucket)

    def floor(self, num_tokens: int, since: int) -> float | None:
        """The least a step of `num_tokens` can cost by what smaller steps were measured
        to cost at step `since` or later: the dearest of the fresh buckets below its
        own (steps never get cheaper with tokens), each at its place on the monotone
        curve; None when there is none."""
        curve = dict(zip(self._sizes, (y for _, y in self._monotone()), strict=True))
        below = [b for b in self._sizes if b < self.bucket(num_tokens) and self._last[b] >= since and self._settled(b)]
        return max(curve[b] for b in below) if below else None

    def _monotone(self) -> list[tuple[float, float]]:
        """(tokens, seconds) per bucket, made non-decreasing from the largest down: where
        a bigger step was measured cheaper than a smaller one, the smaller is priced at
        the bigger's time. Of the two, the higher one is the likelier error (slow
        outliers: a warm-up's first verify step, a collection, a busy host), and an
        error upward is never corrected: a size priced too high is not chosen, so not
        measured again, while one priced too low is chosen once and measured. (Taking
        the dearer one kept the 1.5B shape at batch 1 from drafting for good behind its
        warm-up's slow 2-token step, simulated with 20% step-time jitter.)"""
        if self._curve is None:
            points = [self._point(b) for b in self._sizes]
            mono: list[tuple[float, float]] = []
            for x, y in reversed(points):
                mono.append((x, min(y, mono[-1][1]) if mono else y))
            self._curve = mono[::-1]
        return self._curve

    def _settled(self, bucket: int) -> bool:
        return len(self._obs[bucket]) >= SETTLED

    def describe(self) -> dict[int, list[float]]:
        """bucket -> [mean tokens, median seconds, observations] (for benchmarks' records)."""
        return {b: [*self._point(b), len(self._obs[b])] for b in self._sizes}

    def _point(self, bucket: int) -> tuple[float, float]:
        obs = self._obs[bucket]
        return sum(t for t, _ in obs) / len(obs), statistics.median(s for _, s in obs)

    def seconds(self, num_tokens: int) -> float | None:
        """Predicted step time; None before any measurement."""
        if not self._sizes:
            return None
        mono = self._monotone()
        if num_tokens <= mono[0][0]:
            return mono[0][1]
        i = bisect.bisect_left(mono, num_tokens, key=lambda p: p[0])
        if i < len(mono):
            (x0, y0), (x1, y1) = mono[i - 1], mono[i]
            return y0 + (y1 - y0) * (num_tokens - x0) / max(x1 - x0, 1e-9)
        x, y = mono[-1]
        # Past the largest measurement: the last segment's slope, or with a single
        # measurement its own time. In proportion to tokens would price a memory-bound
        # GPU step's fixed cost into every token, and a size priced too high is never
        # chosen, so never measured to correct it (one 2-token verify step from a
        # warm-up then held a batch at k = 1 for good); a size priced too low is chosen
        # once and measured.
        if len(mono) == 1:
            return y
        (x0, y0) = mono[-2]
        return y + (y - y0) * (num_tokens - x) / max(x - x0, 1e-9)


class PassCost:
    """The seconds a model proposer's passes add to a step, for an allotment being
    built draft by draft: position j of every request drafting at least j tokens runs in
    one batched pass, so a request's j-th draft adds its tokens to pass j (one, or for
    pass 1 the tokens the proposer must catch up on first: `first_pass_tokens`), and
    the first one adds the whole pass (its fixed cost: launches, weights read once).
    Each pass costs what the proposer measured (`model`, by tokens in the pass); before
    any measurement passes count as free, so the first allotments run and measure them."""

    def __init__(self, model: StepCostModel, first_pass_tokens: Sequence[int] | None = None) -> None:
        self.model = model
        self.first_pass_tokens = first_pass_tokens
        self._tokens: list[int] = []  # tokens of pass j + 1 so far
        self.seconds = 0.0

    def fork(self) -> PassCost:
        """A copy to go on adding to (the same measured model)."""
        copy = PassCost(self.model, self.first_pass_tokens)
        copy._tokens, copy.seconds = list(self._tokens), self.seconds
        return copy

    def add(self, candidate: int, depth: int) -> float:
        """Candidate `candidate` takes its draft at position `depth` (1-based; its
        earlier drafts are already in). Returns the passes' total seconds."""
        while len(self._tokens) < depth:
            self._tokens.append(0)
        first = self.first_pass_tokens
        tokens = first[candidate] if depth == 1 and first is not None else 1
        before = self._tokens[depth - 1]
        self._tokens[depth - 1] = before + tokens
        after_s = self.model.seconds(before + tokens)
        if after_s is not None:
            before_s = self.model.seconds(before) if before else 0.0
            self.seconds += after_s - (before_s or 0.0)
        return self.seconds


@dataclass
class Candidate:
    """A request that could speculate: the expected value of each of its proposed
    draft tokens, in order (the chance that it and all before it are accepted)."""

    values: list[float] = field(default_factory=list)
    # For a request idle long enough to try again: its drafts' values at the retry's
    # optimistic acceptance (see `SpeculationPolicy.allot`); None otherwise.
    retry: list[float] | None = None

    @property
    def hopeful(self) -> list[float]:
        return self.retry if self.retry is not None else self.values


@dataclass(frozen=True)
class PolicyConfig:
    max_k: int = 4
    adaptive: bool = True
    # A draft token whose chance of acceptance is below this is never worth proposing
    # even where tokens look free (it still costs proposer and sampling time).
    min_value: float = 0.05


class SpeculationPolicy:
    """Chooses each step's draft lengths from the requests' values and the cost model."""

    def __init__(self, config: PolicyConfig, cost: StepCostModel, pipelined: StepCostModel | None = None) -> None:
        """`cost`: steps that plan drafts (synchronous); `pipelined`: steps launched
        while the previous one runs (async scheduling), which is what a batch that
        drafts nothing goes back to, so the no-draft alternative is priced from it."""
        self.config = config
        self.cost = cost
        self.pipelined = pipelined
        self.on_estimates = False  # whether the last `allot` drafted on the requests' own estimates
        self.measuring_plain = False  # whether it drafted nothing to measure a step without drafts
        # The expected tokens per second of the last `allot`'s drafts on estimates over the
        # no-draft rate (1.0: it drafted nothing on estimates).
        self.expected_gain = 1.0

    def allot(
        self,
        candidates: list[Candidate],
        base_tokens: int,
        base_emitted: int,
        max_extra: int,
        proposer_cost: PassCost | None = None,
        margin: float = 0.0,
    ) -> list[int]:
        """Draft tokens for each candidate. `base_tokens`: the step's tokens without
        drafts (one per decode, prefill chunks); `base_emitted`: tokens the step emits
        without drafts (one per decode); `max_extra`: the token budget left;
        `proposer_cost`: what proposing the drafts costs, for a proposer that runs a
        model (None: free); `margin`: how much better than the no-draft rate drafting
        must be (a batch that is not drafting pays for switching: see the Speculator).

        Whether the step drafts at all is decided on the requests' own estimates
        (`Candidate.values`); `on_estimates` says whether it did. Requests idle long
        enough to try again then ride along where their hopeful values raise the step's
        rate (a few more tokens in a step that is synchronous anyway). Only a step
        that drafts nothing on estimates is decided on the hopeful values: a retry,
        which the caller backs off from, since at a big batch every request idles
        together and a whole batch valued hopefully would draft for nothing."""
        self.on_estimates = self.measuring_plain = False
        self.expected_gain = 1.0
        counts = [0] * len(candidates)
        if max_extra <= 0:
            return counts
        cfg = self.config
        if not cfg.adaptive:
            for i, c in enumerate(candidates):
                take = min(len(c.values), cfg.max_k, max_extra)
                counts[i] = take
                max_extra -= take
            return counts
        hopeful = [c.hopeful for c in candidates]
        if not self.cost.num_buckets:  # no verify step measured yet: take everything, and measure it
            return self._prefix(hopeful, counts, base_tokens, base_emitted, None, max_extra, None)[0]
        # Drafting nothing returns the batch to pipelined steps: the alternative the
        # drafts must beat. (A synchronous step of the same size costs more: the host
        # work the pipeline hides; at batch 64 on an H100 about 1.5x.)
        base_time = self.no_draft_seconds(base_tokens)
        self.measuring_plain = base_time is None
        if base_time is None:
            # No step without drafts of this size measured (a model would price it from
            # bigger ones, and drafts would look free for good): none this time, which
            # measures one.
            return counts
        base_time /= 1 + margin  # the riders' pass below starts from `own`'s step when it drafts
        own, rate = self._prefix([c.values for c in candidates], counts, base_tokens, base_emitted, base_time, max_extra, proposer_cost)
        self.on_estimates = any(own)
        if self.on_estimates:
            self.expected_gain = rate * base_time / max(base_emitted, 1)
        return self._prefix(hopeful, own, base_tokens, base_emitted, base_time, max_extra, proposer_cost)[0]

    def _prefix(
        self,
        values: list[list[float]],
        start: list[int],
        base_tokens: int,
        base_emitted: int,
        base_time: float | None,
        max_extra: int,
        proposer_cost: PassCost | None,
    ) -> tuple[list[int], float]:
        """`start` plus the drafts, best value first, whose count maximizes the step's
        expected tokens per second (`values[i]`: request i's drafts' values), where that
        beats `start` itself; with `base_time` None, every draft worth proposing. Also
        the expected tokens per second chosen (0.0 with `base_time` None: not priced)."""
        counts = list(start)
        drafted = sum(start)
        budget = max_extra - drafted
        if base_time is not None:
            # A step past twice the largest size measured is priced on a guess: go no
            # further than that, and the guess is measured before the next doubling.
            budget = min(budget, self.cost.reach(base_tokens) - base_tokens - drafted)
        order = self._ranked(values, counts, budget)
        if base_time is None:
            for _, i in order:
                counts[i] += 1
            return counts, 0.0
        cost = proposer_cost.fork() if proposer_cost is not None else None
        passes = 0.0
        if cost is not None:
            for i, n in enumerate(start):
                for depth in range(1, n + 1):
                    passes = cost.add(i, depth)
        emitted = float(max(base_emitted, 1)) + sum(sum(vs[:n]) for vs, n in zip(values, start, strict=True))
        if drafted:
            t0 = self.cost.seconds(base_tokens + drafted)
            assert t0 is not None
            best_rate = emitted / (t0 + passes)
        else:
            best_rate = emitted / base_time
        best_n, gained = 0, 0.0
        depth = list(start)
        for n, (value, i) in enumerate(order, start=1):
            gained += value
            depth[i] += 1
            t = self.cost.seconds(base_tokens + drafted + n)
            assert t is not None
            if cost is not None:
                t += cost.add(i, depth[i])
            rate = (emitted + gained) / t
            if rate > best_rate * (1 + 1e-6):
                best_rate, best_n = rate, n
        for _, i in order[:best_n]:
            counts[i] += 1
        return counts, best_rate

    def explore(
        self, candidates: list[Candidate], base_tokens: int, base_emitted: int, max_extra: int, fresh_since: int
    ) -> list[int]:
        """Drafts for an exploratory step (a re-plan that chose nothing): the best drafts
        up to the smallest step size above `base_tokens` whose synchronous cost was not
        measured at step `fresh_since` or later, if drafting that far could pay at all
        (its drafts' whole value over the least such a step can cost, by the smaller
        steps measured, beats the no-draft rate); no drafts when no size qualifies (the
        policy's "no" stands on measurements). One bucket at a time, smallest first:
        each exploration costs at most one step of that size, and a batch at low
        acceptance stops at the first size that shows drafts cannot pay."""
        counts = [0] * len(candidates)
        order = self.ranked(candidates, max_extra)
        top = base_tokens + len(order)
        base_time = self.no_draft_seconds(base_tokens)
        bucket = StepCostModel.bucket(base_tokens + 1)
        while order and bucket // 2 < top:
            n = min(len(order), bucket - base_tokens)
            if not self.cost.measured_since(base_tokens + n, fresh_since):
                floor = self.cost.floor(base_tokens + n, fresh_since)
                gain = sum(v for v, _ in order[:n])
                if base_time is None or floor is None or (max(base_emitted, 1) + gain) / floor > max(base_emitted, 1) / base_time:
                    for _, i in order[:n]:
                        counts[i] += 1
                    return counts
            bucket *= 2
        return counts

    def no_draft_seconds(self, base_tokens: int) -> float | None:
        """What the step costs without drafts: a pipelined step where measured (drafting
        nothing returns the batch to those), else a plain synchronous one; None when
        neither measured a step of about this size or smaller (below its smallest
        measurement a model answers with that measurement's time, which for a much
        bigger step would make every draft look free)."""
        if self.pipelined is not None and self.pipelined.covers(base_tokens, COVER_FACTOR):
            return self.pipelined.seconds(base_tokens)
        # The synchronous model holds verify steps too: only a plain step's own bucket.
        if self.cost.covers(base_tokens):
            return self.cost.seconds(base_tokens)
        return None

    def ranked(self, candidates: list[Candidate], max_extra: int) -> list[tuple[float, int]]:
        """(value, candidate) of every draft worth proposing, best first, within the budget."""
        return self._ranked([c.values for c in candidates], [0] * len(candidates), max_extra)

    def _ranked(self, values: list[list[float]], start: list[int], budget: int) -> list[tuple[float, int]]:
        """(value, i) of request i's drafts after its first start[i], worth proposing,
        best first, at most `budget`. Values of a request's drafts decrease along it, so
        taking the best values first always takes a prefix of each request's drafts."""
        cfg = self.config
        return sorted(
            ((v, i) for i, vs in enumerate(values) for v in vs[start[i] : cfg.max_k] if v >= cfg.min_value),
            key=lambda vi: -vi[0],
        )[: max(budget, 0)]


def draft_values(rate: float, confidence: tuple[float, ...]) -> list[float]:
    """Expected value of each proposed token: the chance it and all before it are
    accepted, from the request's acceptance rate and, where the proposer gives one, its
    own confidence (the smaller of the two: both estimate the same chance)."""
    values: list[float] = []
    joint_conf = 1.0
    for j, conf in enumerate(confidence, start=1):
        joint_conf *= conf
        values.append(min(math.pow(rate, j), joint_conf))
    return values
