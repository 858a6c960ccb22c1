"""The batched passes of a proposer that runs a model (a draft model, an EAGLE head), and
how each pass's drafts are drawn.

One proposal call runs pass 1 over every drafting request's catch-up rows (one-token
rows first: the attention metadata's decodes; then extend rows) and draws draft 1 from
each request's last row; pass j (2..k) runs draft j-1 of every request drafting at
least j tokens, one row each (a pure decode batch), and draws draft j. The token a pass
feeds stays on the device (a placeholder in the sequence, filled from the previous
pass's drawn tensor, as async scheduling does for the target), so the host reads the
drafts once, after the last pass; draft k itself is never fed.

Drawing: each draft row gets the processing target sampling applies (logit_bias,
allowed_token_ids, min_tokens at the row's output count, temperature, top-k/top-p/
min-p). Greedy requests take the argmax; sampled requests draw from the processed
distribution q (returned with the draft: verification needs it to stay exact). A seeded
request's draws come from a generator derived from its seed and the draft's position,
so its drafts depend on its tokens alone, never on the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rtpllm.engine.model_runner import PrevTokens
from rtpllm.engine.request import PLACEHOLDER, Request
from rtpllm.engine.sampler import (
    _apply_token_bias,
    _filter,
    _mask_stops_before_min_tokens,
    has_token_bias,
    to_device,
)
from rtpllm.engine.scheduler import ScheduledRequest, SchedulerOutput
from rtpllm.engine.step_clock import StepClock
from rtpllm.speculative.adaptive import StepCostModel
from rtpllm.speculative.proposer import NO_PROPOSAL, Proposal
from rtpllm.speculative.proposer_kv import DraftSeq
from rtpllm.speculative.verify import RowView

_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """The seed of a seeded request's draft draw at `position` (splitmix64 of the pair):
    the same request at the same position draws the same noise, whatever the batch."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 0x632BE59BD9B4E019) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class Work:
    """One request's part of a proposal call."""

    index: int  # in the batch
    target: Request
    seq: DraftSeq
    k: int  # drafts to make (0: only catching up this call)
    feed: int  # rows pass 1 runs
    picks: list[tuple[int, int]] = field(default_factory=list)  # per draft: (pass, row in its tokens)
    probs: list[torch.Tensor] = field(default_factory=list)  # per draft, sampled requests only


@dataclass
class DraftStats:
    """Totals since start (benchmarks, logs)."""

    passes: int = 0
    pass_tokens: int = 0
    seconds: float = 0.0  # device time of the passes (wall time on CPU)
    dropped: int = 0  # sequences dropped for KV room


# Runs one pass: (its step, the previous pass's drawn tokens (None for pass 1), the works
# drafting in it, in order, and the pass's depth) -> those works' logits rows, in order.
PassForward = Callable[[SchedulerOutput, PrevTokens | None, list[Work], int], torch.Tensor]


def collect_works(
    batch: Sequence[tuple[Request, int]],
    max_len: int,
    budget: int,
    prepare: Callable[[int, Request, int, int, set[str]], Work | None],
) -> list[Work]:
    """The requests of a proposal batch that draft this time, each `prepare(index,
    request, k, tokens left, protected ids)`-d while the catch-up token budget lasts
    (k capped so no draft reaches past `max_len`)."""
    protect = {req.request_id for req, _ in batch}
    works: list[Work] = []
    for index, (req, k) in enumerate(batch):
        k = min(k, max_len - req.num_tokens + 1)
        if k > 0 and budget > 0:
            work = prepare(index, req, k, budget, protect)
            if work is not None:
                works.append(work)
                budget -= work.feed
    return works


def run_passes(
    works: list[Work],
    forward: PassForward,
    generator: torch.Generator,
    cost: StepCostModel,
    stats: DraftStats,
    cuda: bool,
) -> list[Proposal]:
    """Pass 1 (catch-up and draft 1), then one decode pass per further draft position;
    one host copy of every draft at the end. Each pass's time goes into `cost`. Returns
    the works' proposals, in order; the sequences' tokens end with the drafts fed."""
    drawn: list[torch.Tensor] = []  # per pass: the drafts it drew, one per row
    clocks: list[tuple[int, StepClock]] = []
    # Pass 1: 1-token rows first (the attention metadata's decodes), then extends.
    first = sorted(works, key=lambda w: w.feed != 1)
    items = [ScheduledRequest(w.seq.req, w.feed, w.seq.req.num_computed_tokens) for w in first]
    live = [w for w in first if w.k > 0]
    prev: PrevTokens | None = None
    depth = 1
    while True:
        clock = StepClock(cuda)
        step = SchedulerOutput(items, sum(1 for i in items if i.num_new_tokens == 1), [])
        logits = forward(step, prev, live, depth)
        for item in items:
            item.request.num_computed_tokens = item.start + item.num_new_tokens
        if not live:
            clock.stop()
            clocks.append((step.num_tokens, clock))
            break
        tokens, probs = draw_drafts(logits, [w.target for w in live], depth, generator)
        clock.stop()
        clocks.append((step.num_tokens, clock))
        for r, w in enumerate(live):
            w.picks.append((len(drawn), r))
            if probs[r] is not None:
                w.probs.append(probs[r])
        drawn.append(tokens)
        live_rows = [(w, r) for r, w in enumerate(live) if w.k > depth]
        if not live_rows:
            break
        # The next pass feeds each draft from the device: a placeholder here.
        items = []
        for w, _ in live_rows:
            w.seq.req.all_token_ids.append(PLACEHOLDER)
            items.append(ScheduledRequest(w.seq.req, 1, w.seq.req.num_tokens - 1))
        prev = PrevTokens(tokens, {w.seq.req.request_id: r for w, r in live_rows})
        live = [w for w, _ in live_rows]
        depth += 1
    host = torch.cat(drawn).tolist() if drawn else []
    offsets = [0]
    for t in drawn:
        offsets.append(offsets[-1] + t.shape[0])
    for tokens_in_pass, clock in clocks:
        seconds = clock.seconds()
        cost.observe(tokens_in_pass, seconds)
        stats.passes += 1
        stats.pass_tokens += tokens_in_pass
        stats.seconds += seconds
    proposals: list[Proposal] = []
    for w in works:
        draft = tuple(host[offsets[p] + r] for p, r in w.picks)
        inner = w.seq.req.all_token_ids
        fed = len(draft) - 1  # drafts 1..k-1 went in as placeholders
        if fed > 0:
            inner[len(inner) - fed :] = draft[:fed]
        if not draft:
            proposals.append(NO_PROPOSAL)
            continue
        probs = torch.stack(w.probs) if w.probs else None
        proposals.append(Proposal(draft, (1.0,) * len(draft), probs))
    return proposals


def draw_drafts(
    logits: torch.Tensor, targets: list[Request], depth: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Draft `depth` of each target request from its row of draft logits (modified in
    place): the argmax for greedy requests, a draw from the processed distribution q
    (returned with it) for sampled ones. `generator` draws for unseeded requests."""
    views = [RowView(t.params, t.num_output_tokens + depth - 1, t.eos_token_ids) for t in targets]
    if any(has_token_bias(v.params) for v in views):
        _apply_token_bias(logits, views)  # type: ignore[arg-type]
    if any(v.num_output_tokens < v.params.min_tokens for v in views):
        _mask_stops_before_min_tokens(logits, views)  # type: ignore[arg-type]
    tokens = logits.argmax(dim=-1)
    out: list[torch.Tensor | None] = [None] * len(targets)
    sampled = [i for i, t in enumerate(targets) if not t.params.greedy]
    if not sampled:
        return tokens, out
    device = logits.device
    index = to_device(sampled, torch.long, device)
    params = [views[i].params for i in sampled]
    temps = to_device([p.temperature for p in params], logits.dtype, device)
    probs = _filter(logits[index] / temps.unsqueeze(1), params).softmax(dim=-1)
    # The exponential race: argmax(q / e) with e ~ Exp(1) per entry draws from q.
    noise = torch.empty_like(probs)
    seeded = [(j, targets[i]) for j, i in enumerate(sampled) if targets[i].params.seed is not None]
    if len(seeded) < len(sampled):
        noise.exponential_(generator=generator)
    for j, t in seeded:
        seed = t.params.seed
        assert seed is not None
        g = torch.Generator(device=device).manual_seed(position_seed(seed, t.num_tokens + depth - 1))
        noise[j].exponential_(generator=g)
    tokens[index] = (probs / noise).argmax(dim=-1)
    for j, i in enumerate(sampled):
        out[i] = probs[j]
    return tokens, out
