"""Verification of draft tokens against the target model's logits, exact in
distribution.

A speculating request with k draft tokens d_1..d_k runs k+1 positions in one target
pass (its last accepted token, then the drafts) and gets k+1 rows of logits: row i is
the target's distribution p_i for the token after d_1..d_i. Each row gets the same
processing one-token sampling applies (logit_bias, allowed_token_ids, min_tokens with
the row's own output count, temperature, top-k/top-p/min-p), then:

- greedy: accept drafts while d_{i+1} == argmax p_i; emit the target's argmax at the
  first mismatch, or the bonus token argmax p_k when all are accepted. Identical to
  decoding one token at a time.
- sampled (speculative rejection sampling): accept d_{i+1} with probability
  min(1, p_i(d)/q_i(d)); at the first rejection emit a token drawn from the residual
  norm(max(0, p_i - q_i)); when all are accepted, a bonus token drawn from p_k. The
  emitted sequence is distributed exactly as sampling from the target one token at a
  time. Model-free proposers have no distribution: q_i is a point mass on d, so a draft
  is accepted with probability p_i(d) and the residual is p_i without d, renormalized.

Seeded requests draw every uniform and every exponential from their own generator, in
a fixed order per step, so their outputs do not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rtpllm.engine.request import Request
from rtpllm.engine.sampler import (
    LogprobRow,
    _apply_token_bias,
    _filter,
    _mask_stops_before_min_tokens,
    has_token_bias,
    to_device,
)
from rtpllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class SpecRows:
    """One speculating request in a verified batch: its drafts and, for proposers that
    have one, their proposal distribution ([len(draft), vocab] probabilities)."""

    request: Request
    draft: tuple[int, ...]
    draft_probs: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return len(self.draft) + 1


@dataclass
class Verified:
    """What one request emits this step: the accepted drafts and one more token (the
    correction at the first rejection, or the bonus token), with logprob rows if asked."""

    tokens: list[int]
    num_accepted: int
    logprobs: list[LogprobRow | None]
    rows: list[int]  # the logits row each token was drawn from


@dataclass
class RowView:
    """A request as one verification row sees it: the sampler's processing functions
    read only these fields, and min_tokens must count the drafts before this row."""

    params: SamplingParams
    num_output_tokens: int
    eos_token_ids: tuple[int, ...]


def residual(probs: torch.Tensor, draft: torch.Tensor, draft_probs: torch.Tensor | None) -> torch.Tensor:
    """norm(max(0, p - q)) up to its normalization (the exponential race below does not
    need it): with a point-mass q, p with the draft token's entry zeroed."""
    if draft_probs is None:
        return probs.scatter(1, draft.unsqueeze(1), 0.0)
    return (probs - draft_probs).clamp_min(0.0)


def verify(logits: torch.Tensor, batch: Sequence[SpecRows], generator: torch.Generator) -> list[Verified]:
    """logits: [sum of num_rows, vocab] float32, each request's rows together, in batch
    order (modified in place). `generator`: draws for requests without a seed."""
    views: list[RowView] = []
    draft_col: list[int] = []  # per row: the draft it checks, -1 for a bonus row
    for spec in batch:
        req = spec.request
        for i in range(spec.num_rows):
            views.append(RowView(req.params, req.num_output_tokens + i, req.eos_token_ids))
            draft_col.append(spec.draft[i] if i < len(spec.draft) else -1)
    want_logprobs = any(s.request.params.logprobs is not None for s in batch)
    raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
    if any(has_token_bias(v.params) for v in views):
        _apply_token_bias(logits, views)  # type: ignore[arg-type]
    if any(v.num_output_tokens < v.params.min_tokens for v in views):
        _mask_stops_before_min_tokens(logits, views)  # type: ignore[arg-type]

    greedy = logits.argmax(dim=-1).tolist()
    sampled_tok: list[int] = []
    accepted: list[bool] = []
    random_rows = [i for i, v in enumerate(views) if not v.params.greedy]
    if random_rows:
        sampled_tok, accepted = _sample_rows(logits, views, draft_col, random_rows, batch, generator)
    random_pos = {row: j for j, row in enumerate(random_rows)}

    out: list[Verified] = []
    row = 0
    for spec in batch:
        tokens: list[int] = []
        rows: list[int] = []
        num_accepted = 0
        is_greedy = spec.request.params.greedy
        for i in range(spec.num_rows):
            r = row + i
            if i < len(spec.draft):
                ok = greedy[r] == spec.draft[i] if is_greedy else accepted[random_pos[r]]
                if ok:
                    tokens.append(spec.draft[i])
                    rows.append(r)
                    num_accepted += 1
                    continue
            tokens.append(greedy[r] if is_greedy else sampled_tok[random_pos[r]])
            rows.append(r)
            break
        out.append(Verified(tokens, num_accepted, [None] * len(tokens), rows))
        row += spec.num_rows
    if raw_logprobs is not None:
        _fill_logprobs(raw_logprobs, batch, out)
    return out


def _sample_rows(
    logits: torch.Tensor,
    views: list[RowView],
    draft_col: list[int],
    random_rows: list[int],
    batch: Sequence[SpecRows],
    generator: torch.Generator,
) -> tuple[list[int], list[bool]]:
    """For every sampled row: whether its draft is accepted, and a token drawn from its
    residual (draft rows) or from p itself (bonus rows)."""
    device = logits.device
    index = to_device(random_rows, torch.long, device)
    params = [views[i].params for i in random_rows]
    temps = to_device([p.temperature for p in params], logits.dtype, device)
    probs = _filter(logits[index] / temps.unsqueeze(1), params).softmax(dim=-1)
    cols = [draft_col[i] for i in random_rows]
    draft = to_device([max(c, 0) for c in cols], torch.long, device)
    has_draft = to_device([c >= 0 for c in cols], torch.bool, device)

    # Randomness: per request, k+1 uniforms then k+1 rows of exponentials, from the
    # request's generator when seeded (a fixed order, independent of the batch).
    uniforms = torch.empty(len(random_rows), device=device, dtype=probs.dtype)
    noise = torch.empty_like(probs)
    seeded: list[tuple[int, int, torch.Generator]] = []  # (first sampled row, rows, generator)
    pos = {row: j for j, row in enumerate(random_rows)}
    row = 0
    for spec in batch:
        g = spec.request.generator
        if g is not None and not spec.request.params.greedy:
            seeded.append((pos[row], spec.num_rows, g))
        row += spec.num_rows
    if sum(n for _, n, _ in seeded) < len(random_rows):  # some rows have no seed
        uniforms.uniform_(generator=generator)
        noise.exponential_(generator=generator)
    for first, n, g in seeded:
        uniforms[first : first + n].uniform_(generator=g)
        noise[first : first + n].exponential_(generator=g)

    p_draft = probs.gather(1, draft.unsqueeze(1)).squeeze(1)
    full_q = _proposal_rows(batch, random_rows, probs)
    # q(d) of each row's draft, gathered on the device (1 for point masses; bonus rows
    # have no draft and are never accepted).
    q_draft = full_q.gather(1, draft.unsqueeze(1)).squeeze(1) if full_q is not None else torch.ones_like(p_draft)
    accept = (uniforms * q_draft < p_draft) & has_draft  # u < p/q, i.e. min(1, p/q)
    res = torch.where(has_draft.unsqueeze(1), residual(probs, draft, full_q), probs)
    picked = (res / noise).argmax(dim=-1)
    return picked.tolist(), accept.tolist()


def _proposal_rows(batch: Sequence[SpecRows], random_rows: list[int], probs: torch.Tensor) -> torch.Tensor | None:
    """q for every sampled row ([rows, vocab]; bonus rows zero), or None when every
    proposer in the batch is model-free (point masses)."""
    if all(s.draft_probs is None for s in batch):
        return None
    rows: list[torch.Tensor] = []
    zero = torch.zeros(probs.shape[1], device=probs.device, dtype=probs.dtype)
    for spec in batch:
        if spec.request.params.greedy:
            continue
        for i in range(spec.num_rows):
            if i >= len(spec.draft):
                rows.append(zero)
            elif spec.draft_probs is None:
                rows.append(torch.nn.functional.one_hot(torch.tensor(spec.draft[i], device=probs.device), probs.shape[1]).to(probs.dtype))
            else:
                rows.append(spec.draft_probs[i].to(probs.dtype))
    assert len(rows) == len(random_rows)
    return torch.stack(rows)


def _fill_logprobs(raw: torch.Tensor, batch: Sequence[SpecRows], out: list[Verified]) -> None:
    """Logprob rows (raw model distribution, as one-token sampling reports) of every
    emitted token of the requests that asked for them."""
    rows: list[int] = []
    tokens: list[int] = []
    where: list[tuple[int, int, int]] = []  # (request, position, k)
    for b, (spec, ver) in enumerate(zip(batch, out, strict=True)):
        k = spec.request.params.logprobs
        if k is None:
            continue
        for j, (r, t) in enumerate(zip(ver.rows, ver.tokens, strict=True)):
            rows.append(r)
            tokens.append(t)
            where.append((b, j, k))
    if not rows:
        return
    device = raw.device
    sub = raw[to_device(rows, torch.long, device)]
    chosen = sub.gather(1, to_device(tokens, torch.long, device).unsqueeze(1)).squeeze(1)
    ranks = (sub > chosen.unsqueeze(1)).sum(dim=-1) + 1
    k_max = max(k for _, _, k in where)
    top_vals, top_ids = sub.topk(k_max, dim=-1) if k_max else (sub[:, :0], sub[:, :0].long())
    chosen_l, ranks_l, ids_l, vals_l = chosen.tolist(), ranks.tolist(), top_ids.tolist(), top_vals.tolist()
    for n, (b, j, k) in enumerate(where):
        out[b].logprobs[j] = (chosen_l[n], ranks_l[n], ids_l[n][:k], vals_l[n][:k])
