"""The engine's speculative-decoding state: the proposer, each request's acceptance,
the step cost model and the counters behind the metrics. The scheduler asks it for
each step's drafts; the engine reports what was verified and how long steps took."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rtpllm.engine.request import Request
from rtpllm.engine.sampler import needs_history
from rtpllm.speculative.adaptive import (
    AcceptanceEMA,
    Candidate,
    PolicyConfig,
    SpeculationPolicy,
    StepCostModel,
    draft_values,
)
from rtpllm.speculative.proposer import Proposer


@dataclass
class SpecCounters:
    """Totals since start (Prometheus counters read them through EngineStats)."""

    proposed_tokens: int = 0
    accepted_tokens: int = 0
    verified_requests: int = 0  # request-steps that verified at least one draft
    speculative_steps: int = 0
    # accepted drafts per verification -> count; draft length chosen -> count
    acceptance_lengths: dict[int, int] = field(default_factory=dict)
    chosen_k: dict[int, int] = field(default_factory=dict)


class Speculator:
    """Plans drafts per step and learns from their verification."""

    def __init__(self, proposer: Proposer, policy: PolicyConfig, probe_every: int = 16) -> None:
        self.proposer = proposer
        self.config = policy
        self.cost = StepCostModel()
        self.policy = SpeculationPolicy(policy, self.cost)
        self.counters = SpecCounters()
        # A request whose estimate keeps it from speculating gets one optimistic try
        # after this many steps (acceptance changes along a text: a copied passage
        # starts), and a batch that stopped speculating is re-planned synchronously
        # this often (its steps otherwise stay asynchronous and plan nothing).
        self.probe_every = probe_every
        self._ema: dict[str, AcceptanceEMA] = {}
        self._steps_without = 0  # plans in a row that chose no drafts
        self._async_steps = 0  # steps since, left asynchronous

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
        chose no drafts, until a periodic re-plan."""
        if not any(not r.in_prefill and self.eligible(r) for r in running):
            return False
        if self._steps_without == 0:
            return True
        self._async_steps += 1
        if self._async_steps >= self.probe_every:
            self._async_steps = 0
            return True
        return False

    # -- planning ----------------------------------------------------------------------

    def plan(self, decodes: Sequence[Request], base_tokens: int, max_extra: int) -> dict[str, tuple[int, ...]]:
        """Drafts for the step's decoding requests (only those that get any)."""
        cands: list[tuple[Request, tuple[int, ...], Candidate]] = []
        for req in decodes:
            if req.num_placeholders or not self.eligible(req):
                continue
            # The bonus token is one more: drafts never reach past max_tokens.
            room = min(self.config.max_k, req.max_output_tokens - req.num_output_tokens - 1)
            if room <= 0:
                continue
            ema = self._ema.setdefault(req.request_id, AcceptanceEMA())
            private = req.generator is not None and not req.params.greedy
            proposal = self.proposer.propose(req.request_id, req.all_token_ids, room, private=private)
            ema.steps_idle += 1
            if not proposal.tokens:
                continue
            rate = ema.rate
            if ema.steps_idle > self.probe_every:
                rate = max(rate, 0.5)
            cands.append((req, proposal.tokens, Candidate(draft_values(rate, proposal.confidence))))
        if not cands:
            self._steps_without += 1
            return {}
        counts = self.policy.allot([c for _, _, c in cands], base_tokens, len(decodes), max_extra)
        if not any(counts) and self._steps_without % self.probe_every == self.probe_every - 1:
            # Explore: the cost of a size the policy avoids is never measured again, so
            # now and then the most promising request verifies its drafts anyway.
            best = max(range(len(cands)), key=lambda i: sum(cands[i][2].values))
            counts[best] = min(len(cands[best][1]), self.config.max_k, max_extra)
        drafts = {req.request_id: tokens[:n] for (req, tokens, _), n in zip(cands, counts, strict=True) if n}
        for n in counts:
            self.counters.chosen_k[n] = self.counters.chosen_k.get(n, 0) + 1
        self._steps_without = 0 if drafts else self._steps_without + 1
        return drafts

    # -- feedback ----------------------------------------------------------------------

    def observe_verified(self, req: Request, num_proposed: int, num_accepted: int) -> None:
        c = self.counters
        c.proposed_tokens += num_proposed
        c.accepted_tokens += num_accepted
        c.verified_requests += 1
        c.acceptance_lengths[num_accepted] = c.acceptance_lengths.get(num_accepted, 0) + 1
        ema = self._ema.get(req.request_id)
        if ema is not None:
            ema.observe(num_proposed, num_accepted)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.cost.observe(num_tokens, seconds)

    def forget(self, req: Request) -> None:
        self._ema.pop(req.request_id, None)
        normal = req.finish_reason in ("stop", "length")
        self.proposer.forget(req.request_id, req.output_token_ids if normal else None)
