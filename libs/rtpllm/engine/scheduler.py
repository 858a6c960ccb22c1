"""Continuous batching: which requests run in the next step, and how many tokens each.

Policy per step, under a token budget and a cap on running requests:
1. running requests in decode go first (one token each), then running prefills continue
   their next chunk (chunked prefill), each in admission order;
2. when a running request needs a block and none is free, the most recently admitted
   request not yet scheduled this step is preempted (its blocks freed, recomputed later
   from its prompt + outputs, mostly from the prefix cache); if none is left it preempts
   itself;
3. waiting requests are admitted FCFS with whatever budget remains, taking their cached
   prefix from the block manager, unless this step preempted someone. A request whose
   prefix is still being looked up or restored from a KV tier (in the background) stays
   waiting, in its place, while the requests behind it are admitted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rtpllm.config import SchedulerConfig
from rtpllm.engine.request import Request, RequestStatus
from rtpllm.kvcache.block_manager import BlockManager, PrefixHit


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    # Tokens [num_computed_tokens, num_computed_tokens + num_new_tokens) run this step.
    num_new_tokens: int
    start: int
    # Speculative decoding: draft tokens run after the request's last token (they are
    # the last len(draft) of num_new_tokens, and not in the request's tokens).
    draft: tuple[int, ...] = ()

    @property
    def samples(self) -> bool:
        """True when this step reaches the request's last token, so it yields logits to sample."""
        return self.start + self.num_new_tokens - len(self.draft) == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_decodes: int
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


# (decoding requests, tokens of the step without drafts, token budget left for drafts)
# -> draft tokens per request id
DraftPlanner = Callable[[list[Request], int, int], dict[str, tuple[int, ...]]]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        extend_prefix: Callable[[Request, PrefixHit], PrefixHit | None] | None = None,
        plan_drafts: DraftPlanner | None = None,
    ) -> None:
        self.config = config
        # Speculative decoding: the draft tokens of a step's decoding requests.
        self.plan_drafts = plan_drafts
        self.blocks = block_manager
        # Tiered KV: lengthens a prefix hit with blocks restored from below the pool;
        # None while the tiers have not answered yet (the request waits, others run).
        self.extend_prefix = extend_prefix
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, speculate: bool = False) -> SchedulerOutput:
        """`speculate`: plan draft tokens for decoding requests (every token of the
        running requests is on the host: no step in flight)."""
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledRequest] = []
        verifies: list[ScheduledRequest] = []  # decodes with drafts: extend rows, after plain decodes
        prefills: list[ScheduledRequest] = []
        preempted: list[Request] = []
        scheduled_ids: set[str] = set()

        running_decodes: list[Request] = []
        running_prefills: list[Request] = []
        for r in self.running:
            (running_prefills if r.in_prefill else running_decodes).append(r)
        block_size = self.blocks.block_size
        drafts = self._drafts(running_decodes, running_prefills, budget) if speculate and self.plan_drafts else {}
        for req in running_decodes + running_prefills:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if req.num_placeholders and (req.num_output_tokens >= req.max_output_tokens or req.prefill_only):
                continue  # its last token is in flight: nothing left to compute
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            end = req.num_computed_tokens + num_new
            draft = drafts.get(req.request_id, ())[: budget - num_new]
            # Drafts never cause a preemption: they take blocks only while a block per
            # running request stays free (what the others may need this step), else
            # the request decodes plainly.
            if draft and (
                end + len(draft) <= len(self.blocks.block_table(req.request_id)) * block_size
                or (
                    self.blocks.num_free_blocks
                    - (self.blocks.blocks_needed(end + len(draft)) - len(self.blocks.block_table(req.request_id)))
                    >= len(self.running)
                    and self.blocks.allocate(req, end + len(draft))
                )
            ):
                verifies.append(ScheduledRequest(req, num_new + len(draft), req.num_computed_tokens, draft))
                scheduled_ids.add(req.request_id)
                budget -= num_new + len(draft)
                continue
            # Fast path (most decode steps): the request's last block still has room.
            fits = end <= len(self.blocks.block_table(req.request_id)) * block_size
            while not fits and not self.blocks.allocate(req, end):
                victim = self._pick_victim(scheduled_ids)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            item = ScheduledRequest(req, num_new, req.num_computed_tokens)
            (prefills if req.in_prefill else decodes).append(item)
            scheduled_ids.add(req.request_id)
            budget -= num_new

        if not preempted:
            budget = self._admit_waiting(budget, prefills)
        return SchedulerOutput(scheduled=decodes + verifies + prefills, num_decodes=len(decodes), preempted=preempted)

    def _drafts(self, decodes: list[Request], prefills: list[Request], budget: int) -> dict[str, tuple[int, ...]]:
        """Draft tokens per decoding request, planned with the step's other tokens in
        view: one per decode and the running prefills' next chunks."""
        assert self.plan_drafts is not None
        base = len(decodes) + sum(r.num_tokens - r.num_computed_tokens for r in prefills)
        base = min(base, budget)
        return self.plan_drafts(decodes, base, budget - base)

    def _admit_waiting(self, budget: int, prefills: list[ScheduledRequest]) -> int:
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            if req.kv_reserved:
                if not self._admit_reserved(req, budget, prefills):
                    self.waiting.appendleft(req)
                    break
                budget -= prefills[-1].num_new_tokens
                continue
            if not self._sibling_ready(req):
                deferred.append(req)
                continue
            hit = self.blocks.find_prefix(req)
            if req.params.prompt_logprobs is not None and req.prompt_logprobs_done < req.num_prompt_tokens - 1:
                # Prompt logprobs need the logits of every prompt position: no cache hits.
                hit = PrefixHit((), 0)
            elif self.extend_prefix is not None:
                extended = self.extend_prefix(req, hit)
                if extended is None:  # its KV-tier lookup or restore is under way
                    deferred.append(req)
                    continue
                hit = extended
            num_new = min(req.num_tokens - hit.num_tokens, budget)
            if not self.blocks.allocate(req, hit.num_tokens + num_new, hit):
                self.waiting.appendleft(req)
                break
            req.num_computed_tokens = hit.num_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = hit.num_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            prefills.append(ScheduledRequest(req, num_new, hit.num_tokens))
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))
        return budget

    def _admit_reserved(self, req: Request, budget: int, prefills: list[ScheduledRequest]) -> bool:
        """Admit a request that already holds blocks with `num_computed_tokens` of KV in
        them (disaggregated prefill): it continues from there, like a running prefill."""
        num_new = min(req.num_tokens - req.num_computed_tokens, budget)
        if not self.blocks.allocate(req, req.num_computed_tokens + num_new):
            return False
        req.kv_reserved = False
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        prefills.append(ScheduledRequest(req, num_new, req.num_computed_tokens))
        return True

    def add_reserved(self, request: Request) -> None:
        """Queue a request whose blocks are already allocated, ahead of new requests
        (it holds memory, so it should run first)."""
        request.kv_reserved = True
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _sibling_ready(self, req: Request) -> bool:
        """n > 1: later samples wait until the first has computed the prompt's full blocks,
        then find them in the prefix cache instead of prefilling the prompt again."""
        lead = req.wait_for
        if lead is None or lead.is_finished or not self.blocks.enable_prefix_caching:
            return True
        full = (lead.num_prompt_tokens // self.blocks.block_size) * self.blocks.block_size
        return lead.num_computed_tokens >= full

    def _pick_victim(self, scheduled_ids: set[str]) -> Request:
        for req in reversed(self.running):
            if req.request_id not in scheduled_ids:
                return req
        raise AssertionError("no preemptible request: every running request is already scheduled")

    def _preempt(self, req: Request) -> None:
        self.blocks.free(req.request_id)
        self.running.remove(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, output: SchedulerOutput) -> None:
        """Once the step is launched: its tokens count as computed (their KV is written
        before any later step reads it, the device runs steps in order)."""
        for item in output.scheduled:
            # Draft tokens count once verified (the engine adds the accepted ones).
            item.request.num_computed_tokens = item.start + item.num_new_tokens - len(item.draft)

    def commit(self, req: Request) -> None:
        """Offer the request's finished, fully known blocks to the prefix cache."""
        if req.status is RequestStatus.RUNNING and self.blocks.has_table(req.request_id):
            self.blocks.commit(req, min(req.num_computed_tokens, req.num_known_tokens))

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Remove a request wherever it is and release its blocks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.blocks.free(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
