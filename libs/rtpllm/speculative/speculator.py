"""The engine's speculative-decoding state: the proposer, each request's acceptance,
the step cost model and the counters behind the metrics. The scheduler asks it for
each step's drafts; the engine reports what was verified and how long steps took."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rtpllm.engine.request import Request
from rtpllm.engine.sampler import needs_history
from rtpllm.engine.scheduler import SchedulerOutput
from rtpllm.speculative.adaptive import (
    AcceptanceEMA,
    Candidate,
    PassCost,
    PolicyConfig,
    RecentAcceptance,
    SpeculationPolicy,
    StepCostModel,
    draft_values,
    pooling_weight,
)
from rtpllm.speculative.proposer import NO_PROPOSAL, FeatureRows, Proposal, Proposer

log = logging.getLogger(__name__)

MAX_BACKOFF = 4  # re-plans at most every probe_every * 16 steps
# A request idle for probe_every steps hopes for at least this acceptance (see `plan`).
RETRY_RATE = 0.5
START_MARGIN = 0.1
# A spell drafting on its estimates whose plan expected less than this gain over
# pipelined steps may be ending: at a small batch (at most SMALL_BATCH decoding) its next
# step first checks from the estimates whether a plan could draft (`wants_step`). At a
# big batch the check's host time would be on the critical path of every step of the
# spell (~0.5 ms at batch 64 on a CPU core) to save one step at its end.
MARGINAL_GAIN = 1.15
SMALL_BATCH = 16
# The acceptance of recent verifications, all requests together, is every request's
# prior: about the last hundred verifications.
RECENT_DECAY = 0.99


@dataclass
class _Spell:
    """Consecutive drafting steps: their time, and what pipelined steps would have
    taken to emit the same tokens."""

    seconds: float = 0.0
    pipelined_seconds: float = 0.0

    def add(self, seconds: float, pipelined_seconds: float) -> None:
        self.seconds += seconds
        self.pipelined_seconds += pipelined_seconds


@dataclass
class SpecCounters:
    """Totals since start (Prometheus counters read them through EngineStats)."""

    proposed_tokens: int = 0
    accepted_tokens: int = 0
    verified_requests: int = 0  # request-steps that verified at least one draft
    speculative_steps: int = 0
    empty_plans: int = 0  # plans that drafted for no request (the batch goes back to pipelined steps)
    prechecked_plans: int = 0  # of those, re-plans decided without a synchronous step (`wants_step`)
    proposer_failures: int = 0  # proposals that raised (the step ran without drafts)
    # accepted drafts per verification -> count; draft length chosen -> count
    acceptance_lengths: dict[int, int] = field(default_factory=dict)
    chosen_k: dict[int, int] = field(default_factory=dict)


class Speculator:
    """Plans drafts per step and learns from their verification."""

    def __init__(self, proposer: Proposer, policy: PolicyConfig, probe_every: int = 16) -> None:
        self.proposer = proposer
        self.config = policy
        self.cost = StepCostModel()  # steps that planned drafts (synchronous)
        self.pipelined_cost = StepCostModel()  # steps launched behind the previous one
        self.policy = SpeculationPolicy(policy, self.cost, self.pipelined_cost)
        self.counters = SpecCounters()
        # A request whose estimate keeps it from speculating gets one optimistic try
        # after this many steps (acceptance changes along a text: a copied passage
        # starts), and a batch that stopped speculating is re-planned synchronously
        # this often (its steps otherwise stay asynchronous and plan nothing).
        self.probe_every = probe_every
        self._ema: dict[str, AcceptanceEMA] = {}
        # A request's estimate leans on what the proposer achieved lately for all
        # requests until it has evidence of its own, not on a fixed prior: on a loaded
        # H100 a fixed 0.5 kept every new request from drafting where the proposer was
        # right 70% of the time (its first drafts must pay for a synchronous step of the
        # whole batch), and drafted for 8 steps where it was right 29%.
        self._recent = RecentAcceptance(decay=RECENT_DECAY)
        self._retrying: set[str] = set()  # this plan's requests idle long enough to try again
        self._steps_without = 0  # plans in a row that chose no drafts
        self._async_steps = 0  # steps since, left asynchronous
        # Re-plans that chose nothing (exploration aside) double the wait for the next,
        # up to probe_every * 2**MAX_BACKOFF steps: on a loaded server where drafts
        # never pay, each re-plan is a synchronous step, which costs its hidden host work.
        self._backoff = 0
        self._skipped = 0  # steps since the last plan (they planned nothing)
        self._steps = 0  # steps observed: the cost models' clock
        self._drafted: tuple[int, int] | None = None  # (tokens without drafts, decodes) of the step planned
        self._spell = _Spell()  # the drafting steps since the last plan that drafted nothing
        self._step_accepted = 0  # drafts accepted in the step being verified
        # A verify-step size measured longer ago than this may be explored again (the
        # contexts grow, the batch changes): once per longest re-plan wait.
        self.explore_stale_steps = probe_every << MAX_BACKOFF
        self.explorations = 0
        self._planned = False  # whether any plan was made yet
        self._last_gain = 1.0  # the last plan's expected gain (SpeculationPolicy.expected_gain)
        # A batch that is not drafting starts only for drafts this much better than its
        # pipelined steps: a drafting spell ends with a step that planned synchronously
        # and drafted nothing, which the spell's gain must repay.
        self.start_margin = START_MARGIN
        self.separately_charged_s = 0.0  # draft passes since the last observed step
        # The last plan's proposal distributions (request id -> [drafts, vocab]), read
        # by verification in the same step.
        self._probs: dict[str, torch.Tensor] = {}

    # -- which requests, which steps ------------------------------------------------

    @staticmethod
    def eligible(req: Request) -> bool:
        """Whether the request may speculate at all: asked for (SamplingParams.speculative)
        and nothing in it needs one token at a time. Penalties read the history per
        token, a grammar must accept every draft before it can be verified, M-RoPE and
        prefill-only requests have their own positions and handoff."""
        p = req.params
        return (
            p.speculative
            and not needs_history(p)
            and req.grammar is None
            and not req.prefill_only
            and req.mrope_positions is None
        )

    def wants_step(self, running: Sequence[Request]) -> bool:
        """Whether the next step should plan drafts, which needs every running token on
        the host (a synchronous step). False keeps async scheduling: when the last plan
        chose no drafts, until a periodic re-plan; and where the estimates alone show
        that a plan would draft nothing (`_could_draft`), checked before a re-plan,
        after a step that drafted on hope (an exploration or a retry: often a spell's
        only step), and in a marginal spell at a small batch (MARGINAL_GAIN)."""
        if self._steps_without > 0:
            # Counted before the scan below: most steps of a loaded batch stop here, and
            # a pipelined step's host work is on the critical path once it matches the GPU's.
            self._async_steps += 1
            # Drafts declined only to measure a plain step of a new size (the batch
            # shrank below any measured): re-plan once a pipelined one is timed.
            wait = 2 if self.policy.measuring_plain else self.probe_every << self._backoff
            if self._async_steps < wait:
                self._skipped += 1
                return False
            self._async_steps = 0
        if not any(not r.in_prefill and self.eligible(r) for r in running):
            return False
        uncertain = self._steps_without > 0 or not self.policy.on_estimates
        marginal = self._last_gain < MARGINAL_GAIN and len(running) <= SMALL_BATCH
        if self._planned and (uncertain or marginal) and not self._could_draft(running):
            # Decided here, without the synchronous step a plan needs (its host work,
            # which the pipeline hides, ~2 ms a step at batch 64 on an H100, and the
            # pipeline's restart after it): the bookkeeping of a plan that drafted nothing.
            self._skipped += 1
            self.counters.empty_plans += 1
            self.counters.prechecked_plans += 1
            if self._steps_without > 0 and not self.policy.measuring_plain:
                self._backoff = min(self._backoff + 1, MAX_BACKOFF)  # as `_allot` after a fruitless re-plan
            self._steps_without += 1
            self._end_spell()
            return False
        return True

    def _could_draft(self, running: Sequence[Request]) -> bool:
        """Whether a re-plan now could draft for any request, from the estimates alone:
        the plan's allotment and exploration over drafts of full length and confidence 1
        with no proposer cost, which can only lower a real plan's drafts, so False means
        the plan would draft nothing. One difference: the step is priced without prefill
        chunks (their size is the scheduler's to choose), and next to a chunk drafts can
        look cheaper; a start missed that way waits for the next re-plan."""
        elapsed = 1 + self._skipped
        decodes = [r for r in running if not r.in_prefill]
        # Under async scheduling every running request has its last token in flight here.
        rooms = self._rooms(decodes, in_flight=True)
        if not rooms:
            return False
        cands = []
        for _, room, rate, retrying in self._rates(rooms, unseen_steps=elapsed):
            conf = (1.0,) * room
            cands.append(Candidate(draft_values(rate, conf), draft_values(RETRY_RATE, conf) if retrying else None))
        base = len(decodes)
        counts, _ = self._choose(cands, base, base, base * self.config.max_k, None)
        return any(counts)

    # -- planning ----------------------------------------------------------------------

    def plan(self, decodes: Sequence[Request], base_tokens: int, max_extra: int) -> dict[str, tuple[int, ...]]:
        """Drafts for the step's decoding requests (only those that get any). The
        proposal distributions of sampled drafts wait in `draft_probs` for verification."""
        self._probs = {}
        # Steps, not plans: while nothing is drafted, a plan comes only every probe_every steps.
        elapsed, self._skipped = 1 + self._skipped, 0
        ready: list[tuple[Request, int, float]] = []  # (request, most drafts, acceptance rate)
        self._retrying = set()
        rooms = self._rooms(decodes)
        for _, _, ema in rooms:
            ema.steps_idle += elapsed
        for req, room, rate, retrying in self._rates(rooms):
            if retrying:
                self._retrying.add(req.request_id)
            ready.append((req, room, rate))
        cost = self.proposer.cost([req for req, _, _ in ready]) if ready else None
        if cost is None:
            chosen = self._plan_free(ready, base_tokens, len(decodes), max_extra)
        else:
            chosen = self._plan_costly(ready, base_tokens, len(decodes), max_extra, cost)
        drafts: dict[str, tuple[int, ...]] = {}
        for req, proposal, n in chosen:
            self.counters.chosen_k[n] = self.counters.chosen_k.get(n, 0) + 1
            if n:
                drafts[req.request_id] = proposal.tokens[:n]
                if proposal.probs is not None:
                    self._probs[req.request_id] = proposal.probs[:n]
                if req.request_id in self._retrying:
                    # A retry starts the estimate afresh: its premise is that the old
                    # evidence is out of date, and an estimate that only moves when it
                    # drafts would otherwise stay low long after acceptance recovered.
                    self._ema[req.request_id].restart()
        self._steps_without = 0 if drafts else self._steps_without + 1
        self._drafted = (base_tokens, len(decodes)) if drafts else None
        if not drafts:
            self.counters.empty_plans += 1
            self._end_spell()
        return drafts

    def _rooms(self, decodes: Sequence[Request], in_flight: bool = False) -> list[tuple[Request, int, AcceptanceEMA]]:
        """The requests that may draft this step, with how many drafts each has room
        for (the bonus token is one more: drafts never reach past max_tokens) and its
        acceptance estimate. A request with a token still in flight (a placeholder)
        cannot be proposed for, so a plan leaves it out; `in_flight` keeps it, for
        `_could_draft`, which runs before the synchronous step resolves it."""
        rooms: list[tuple[Request, int, AcceptanceEMA]] = []
        for req in decodes:
            if (req.num_placeholders and not in_flight) or not self.eligible(req):
                continue
            room = min(self.config.max_k, req.max_output_tokens - req.num_output_tokens - 1)
            if room > 0:
                rooms.append((req, room, self._ema.setdefault(req.request_id, AcceptanceEMA())))
        return rooms

    def _rates(
        self, rooms: list[tuple[Request, int, AcceptanceEMA]], unseen_steps: int = 0
    ) -> list[tuple[Request, int, float, bool]]:
        """(request, room, acceptance estimate, whether it is idle long enough to try
        again) for `_rooms`' requests. How alike the batch's requests are sets how much
        each leans on the others. `unseen_steps`: steps not yet counted in the requests'
        idle time (a plan counts them first)."""
        floor = pooling_weight([ema for _, _, ema in rooms])
        rated = []
        for req, room, ema in rooms:
            rate = ema.rate_given(self._recent.rate_without(ema), floor)
            rated.append((req, room, rate, ema.steps_idle + unseen_steps > self.probe_every and rate < RETRY_RATE))
        return rated

    def _candidate(self, req: Request, rate: float, confidence: tuple[float, ...]) -> Candidate:
        retry = draft_values(RETRY_RATE, confidence) if req.request_id in self._retrying else None
        return Candidate(draft_values(rate, confidence), retry)

    def _plan_free(
        self, ready: list[tuple[Request, int, float]], base_tokens: int, base_emitted: int, max_extra: int
    ) -> list[tuple[Request, Proposal, int]]:
        """Proposing is free next to a step (model-free proposers): propose for every
        request, then choose lengths from the proposals' values, confidence included."""
        proposals = self._propose([(req, room) for req, room, _ in ready])
        kept = [(req, p, rate) for (req, _, rate), p in zip(ready, proposals, strict=True) if p.tokens]
        cands = [self._candidate(req, rate, p.confidence) for req, p, rate in kept]
        counts = self._allot(cands, [len(p.tokens) for _, p, _ in kept], base_tokens, base_emitted, max_extra, None)
        return [(req, p, n) for (req, p, _), n in zip(kept, counts, strict=True)]

    def _plan_costly(
        self,
        ready: list[tuple[Request, int, float]],
        base_tokens: int,
        base_emitted: int,
        max_extra: int,
        cost: PassCost,
    ) -> list[tuple[Request, Proposal, int]]:
        """Proposing runs a model (a pass per draft position): choose lengths first,
        from acceptance alone with the passes' cost in the step's, then propose exactly
        those (a draft never computed costs nothing)."""
        cands = [self._candidate(req, rate, (1.0,) * room) for req, room, rate in ready]
        counts = self._allot(cands, [room for _, room, _ in ready], base_tokens, base_emitted, max_extra, cost)
        asked = [(req, n) for (req, _, _), n in zip(ready, counts, strict=True) if n]
        started = time.perf_counter()
        proposals = iter(self._propose(asked))
        # The passes are charged by their own cost model (PassCost): kept out of the
        # step's wall time, which `observe_step` measures.
        self.separately_charged_s += time.perf_counter() - started
        chosen: list[tuple[Request, Proposal, int]] = []
        for (req, _, _), n in zip(ready, counts, strict=True):
            proposal = next(proposals) if n else NO_PROPOSAL
            chosen.append((req, proposal, min(n, len(proposal.tokens))))
        return chosen

    def _propose(self, batch: list[tuple[Request, int]]) -> list[Proposal]:
        """The proposer's proposals; none when it fails. A failing proposer (a draft
        model's allocation or kernel) costs the step its drafts, never the step: the
        requests decode without them and the proposer starts over."""
        if not batch:
            return []
        try:
            return self.proposer.propose_batch(batch)
        except Exception:
            log.exception("speculative proposer %s failed: this step runs without drafts", self.proposer.name or type(self.proposer).__name__)
            self.counters.proposer_failures += 1
            self.proposer.recover()
            return [NO_PROPOSAL] * len(batch)

    def _allot(
        self,
        cands: list[Candidate],
        lengths: list[int],
        base_tokens: int,
        base_emitted: int,
        max_extra: int,
        cost: PassCost | None,
    ) -> list[int]:
        if not cands:
            return []
        first, self._planned = not self._planned, True
        counts, explored = self._choose(cands, base_tokens, base_emitted, max_extra, cost, first)
        self._last_gain = self.policy.expected_gain
        if explored:
            self.explorations += any(counts)
            if not any(counts):  # drafting spells are judged when they end (`_end_spell`)
                self._backoff = min(self._backoff + 1, MAX_BACKOFF)
        return [min(n, length) for n, length in zip(counts, lengths, strict=True)]

    def _choose(
        self,
        cands: list[Candidate],
        base_tokens: int,
        base_emitted: int,
        max_extra: int,
        cost: PassCost | None,
        first: bool = False,
    ) -> tuple[list[int], bool]:
        """The policy's drafts and whether they come from an exploration: the
        allotment; where it drafts nothing, a periodic re-plan (every probe_every steps
        or more, once a plan chose nothing), or the `first` plan of all, may explore a
        size whose cost is unmeasured, unsettled or stale (SpeculationPolicy.explore)."""
        margin = self.start_margin if self._steps_without > 0 else 0.0
        counts = self.policy.allot(cands, base_tokens, base_emitted, max_extra, cost, margin)
        if any(counts) or not (self._steps_without > 0 or first) or self.policy.measuring_plain:
            return counts, False
        return self.policy.explore(cands, base_tokens, base_emitted, max_extra, self._steps - self.explore_stale_steps), True

    def draft_probs(self, request_id: str, num_drafts: int) -> torch.Tensor | None:
        """The proposal distribution of a request's first `num_drafts` drafts in this
        step's plan ([num_drafts, vocab]), or None for point masses (model-free
        proposers, greedy requests)."""
        probs = self._probs.get(request_id)
        return probs[:num_drafts] if probs is not None else None

    # -- feedback ----------------------------------------------------------------------

    def observe_verified(self, req: Request, num_proposed: int, num_accepted: int) -> None:
        c = self.counters
        c.proposed_tokens += num_proposed
        c.accepted_tokens += num_accepted
        c.verified_requests += 1
        self._step_accepted += num_accepted
        c.acceptance_lengths[num_accepted] = c.acceptance_lengths.get(num_accepted, 0) + 1
        ema = self._ema.get(req.request_id)
        if ema is not None:
            ema.observe(num_proposed, num_accepted)
            self._recent.observe(ema, num_proposed, num_accepted)

    def observe_step(self, num_tokens: int, seconds: float | None, pipelined: bool = False) -> None:
        """A step of `num_tokens` tokens ran. `seconds`: its wall time (the engine's
        `step()` call, less a draft model's passes, which have their own model), or None
        when that time is not a whole step's (a step launched with nothing in flight and
        left in flight: the call measured only its host work). `pipelined`: launched
        while the previous step ran (it planned nothing)."""
        self._steps += 1
        charged, self.separately_charged_s = self.separately_charged_s, 0.0
        drafted, self._drafted = self._drafted, None
        accepted, self._step_accepted = self._step_accepted, 0
        if seconds is None:
            return
        seconds = max(seconds - charged, 1e-6)
        (self.pipelined_cost if pipelined else self.cost).observe(num_tokens, seconds, at=self._steps)
        if drafted is not None and not pipelined:
            base_tokens, decodes = drafted
            base = self.policy.no_draft_seconds(base_tokens)  # what the policy weighed the drafts against
            if base is not None:
                self._spell.add(seconds + charged, base * (decodes + accepted) / max(decodes, 1))

    def _end_spell(self) -> None:
        """The back-off follows what drafting yielded, judged over a whole spell of
        drafting steps (one step at a small batch is a coin toss): a spell that emitted
        its tokens faster than pipelined steps would have clears it; one that did not
        adds to it, as a re-plan that drafts nothing does."""
        spell, self._spell = self._spell, _Spell()
        if spell.seconds <= 0:
            return
        if spell.seconds <= spell.pipelined_seconds:
            self._backoff = 0
        else:
            self._backoff = min(self._backoff + 1, MAX_BACKOFF)

    def observe_features(self, step: SchedulerOutput, features: torch.Tensor, accepted: dict[str, int]) -> None:
        """A step's hidden-state features ([packed rows, width], rows in packing order)
        for a proposer that reads them: the rows of requests that may speculate, of a
        verified request only its last token and its `accepted` drafts."""
        rows: list[FeatureRows] = []
        row = 0
        for item in step.scheduled:
            req = item.request
            if self.eligible(req) and not req.is_finished:
                count = 1 + accepted.get(req.request_id, 0) if item.draft else item.num_new_tokens
                rows.append(FeatureRows(req, item.start, row, count))
            row += item.num_new_tokens
        if rows:
            self.proposer.observe_features(rows, features)

    def forget(self, req: Request) -> None:
        self._ema.pop(req.request_id, None)
        normal = req.finish_reason in ("stop", "length")
        self.proposer.forget(req.request_id, req.output_token_ids if normal else None)
        if not self._ema:
            self._lull()

    def _lull(self) -> None:
        """The last request that could speculate left: the batch whose drafts did not
        pay (the re-plan wait and its back-off) is gone, so the next requests are planned
        at once, as by a fresh engine. What was measured (step costs, recent acceptance)
        stays. Without this, an open H100 run at batch 64 began its second pass with 35
        plain steps: its first pass's tail had ended in plans that drafted nothing."""
        self._steps_without = self._async_steps = self._skipped = self._backoff = 0
        self._spell = _Spell()
