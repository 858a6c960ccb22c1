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
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class AcceptanceEMA:
    """Per-request acceptance estimate (see the module docstring)."""

    decay: float = 0.8
    accepted: float = 1.0  # prior: a = 0.5 ...
    rejected: float = 1.0  # ... worth two observations
    steps_idle: int = 0  # steps since the request last verified a draft

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, num_proposed: int, num_accepted: int) -> None:
        d = self.decay
        self.accepted = d * self.accepted + (1 - d) * num_accepted
        self.rejected = d * self.rejected + (1 - d) * (1.0 if num_accepted < num_proposed else 0.0)
        self.steps_idle = 0


class StepCostModel:
    """Step seconds as a function of tokens in the batch, measured on the running
    machine: per power-of-two bucket of token counts, the median of its last steps,
    interpolated linearly between measured buckets. Sizes above the largest measurement extrapolate in
    proportion to tokens (never cheaper per token than measured); below the smallest,
    the smallest's time (a step never costs less than a smaller one)."""

    def __init__(self, window: int = 9) -> None:
        # The median of a bucket's last `window` steps: a step slowed by something else
        # (a collection, a neighbour on the host) must not make its size look costly
        # for long, since the policy then avoids that size and would not re-measure it.
        self.window = window
        self._sizes: list[int] = []  # bucket sizes, sorted
        self._obs: dict[int, deque[tuple[int, float]]] = {}  # bucket -> (tokens, seconds)

    @property
    def num_buckets(self) -> int:
        return len(self._sizes)

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        bucket = 1 << max(num_tokens - 1, 0).bit_length()
        if bucket not in self._obs:
            bisect.insort(self._sizes, bucket)
            self._obs[bucket] = deque(maxlen=self.window)
        self._obs[bucket].append((num_tokens, seconds))

    def _point(self, bucket: int) -> tuple[float, float]:
        obs = self._obs[bucket]
        return sum(t for t, _ in obs) / len(obs), statistics.median(s for _, s in obs)

    def seconds(self, num_tokens: int) -> float | None:
        """Predicted step time; None before any measurement."""
        if not self._sizes:
            return None
        points = [self._point(b) for b in self._sizes]
        # Keep the curve non-decreasing: noise must not make more tokens look cheaper.
        mono: list[tuple[float, float]] = []
        for x, y in points:
            mono.append((x, max(y, mono[-1][1]) if mono else y))
        if num_tokens <= mono[0][0]:
            return mono[0][1]
        for (x0, y0), (x1, y1) in zip(mono, mono[1:], strict=False):
            if num_tokens <= x1:
                return y0 + (y1 - y0) * (num_tokens - x0) / max(x1 - x0, 1e-9)
        x, y = mono[-1]
        return y * num_tokens / x


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

    def allot(
        self,
        candidates: list[Candidate],
        base_tokens: int,
        base_emitted: int,
        max_extra: int,
        proposer_cost: PassCost | None = None,
    ) -> list[int]:
        """Draft tokens for each candidate. `base_tokens`: the step's tokens without
        drafts (one per decode, prefill chunks); `base_emitted`: tokens the step emits
        without drafts (one per decode); `max_extra`: the token budget left;
        `proposer_cost`: what proposing the drafts costs, for a proposer that runs a
        model (None: free)."""
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
        order = self._by_value(candidates, max_extra)
        base_time = self.cost.seconds(base_tokens)
        if base_time is not None and self.pipelined is not None:
            # Drafting nothing returns the batch to pipelined steps: the alternative
            # the drafts must beat. (A synchronous step of the same size costs more: the
            # host work the pipeline hides; at batch 64 on an H100 about 1.5x.)
            base_time = self.pipelined.seconds(base_tokens) or base_time
        if base_time is None:  # nothing measured yet: take everything, and measure it
            for _, i in order:
                counts[i] += 1
            return counts
        emitted = float(max(base_emitted, 1))
        best_rate, best_n = emitted / base_time, 0
        gained = 0.0
        depth = [0] * len(candidates)
        for n, (value, i) in enumerate(order, start=1):
            gained += value
            depth[i] += 1
            t = self.cost.seconds(base_tokens + n)
            assert t is not None
            if proposer_cost is not None:
                t += proposer_cost.add(i, depth[i])
            rate = (emitted + gained) / t
            if rate > best_rate * (1 + 1e-6):
                best_rate, best_n = rate, n
        for _, i in order[:best_n]:
            counts[i] += 1
        return counts


    def allot_all(self, candidates: list[Candidate], max_extra: int) -> list[int]:
        """Every draft worth proposing at all (value >= min_value), whatever it costs: an
        exploratory step, which measures what the whole batch's drafts cost."""
        counts = [0] * len(candidates)
        for _, i in self._by_value(candidates, max_extra):
            counts[i] += 1
        return counts

    def _by_value(self, candidates: list[Candidate], max_extra: int) -> list[tuple[float, int]]:
        """(value, candidate) of every draft worth proposing, best first, within the
        budget. Values of a request's drafts decrease along it, so taking the best
        values first always takes a prefix of each request's drafts."""
        cfg = self.config
        return sorted(
            ((v, i) for i, c in enumerate(candidates) for v in c.values[: cfg.max_k] if v >= cfg.min_value),
            key=lambda vi: -vi[0],
        )[: max(max_extra, 0)]


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
