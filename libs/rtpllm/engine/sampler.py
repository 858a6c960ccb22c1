"""Turns a batch of logits into next tokens (and their logprobs), on the logits' device.

Order of operations per row: raw logprobs (what the API reports), penalties
(repetition on prompt+output, presence/frequency on output), logit_bias and
allowed_token_ids, min_tokens masking of stop tokens (after the bias, so a bias cannot
end a request early), then greedy argmax or temperature -> top-k -> top-p -> min-p ->
sampling.

Sampling draws one exponential per vocabulary entry and takes argmax(p / e), which
samples from p exactly; a request with a seed draws from its own generator, so its
tokens do not depend on what else is in the batch.

`sample()` never waits for the GPU: every decision is made from host-side parameters
and small tensors go up through pinned memory. The result's `resolve()` is the one
synchronisation point, so the engine can prepare the next step before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtpllm.engine.request import Request
from rtpllm.sampling_params import SamplingParams
from rtpllm.structured.bitmask import TokenMask

LogprobRow = tuple[float, int, list[int], list[float]]


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device` without a host synchronisation."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass
class PendingSample:
    """Sampled tokens still on the device, with a copy to the host under way."""

    tokens: torch.Tensor  # [B] int64 on the device (next step's inputs read it there)
    _host_tokens: torch.Tensor
    _logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    _logprob_rows: list[int | None]
    _event: torch.cuda.Event | None

    def token_ids(self) -> list[int]:
        """Wait for the step and return its token ids (any thread: the grammar worker
        reads a step still in flight this way)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host_tokens.tolist()

    def resolve(self) -> tuple[list[int], list[LogprobRow | None]]:
        """Wait for the step and return (token ids, logprob rows)."""
        if self._event is not None:
            self._event.synchronize()
        token_list = self._host_tokens.tolist()
        rows: list[LogprobRow | None] = [None] * len(token_list)
        if self._logprobs is not None:
            chosen, ranks, top_ids, top_vals = (t.tolist() for t in self._logprobs)
            for i, k in enumerate(self._logprob_rows):
                if k is not None:
                    rows[i] = (chosen[i], ranks[i], top_ids[i][:k], top_vals[i][:k])
        return token_list, rows


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    for row, req in enumerate(requests):
        p = req.params
        if p.repetition_penalty != 1.0:
            seen = to_device(sorted(set(req.all_token_ids)), torch.long, logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
            out = to_device(req.output_token_ids, torch.long, logits.device)
            counts = torch.zeros(logits.shape[1], device=logits.device, dtype=logits.dtype)
            counts.scatter_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _argmax_only(req: Request) -> bool:
    """True when the request's next token is the argmax of its raw logits: greedy, no
    logprobs, nothing that edits the logits (penalties, biases, min_tokens)."""
    p = req.params
    return (
        p.greedy
        and p.logprobs is None
        and not needs_history(p)
        and not has_token_bias(p)
        and req.num_output_tokens >= p.min_tokens
    )


def needs_history(params: SamplingParams) -> bool:
    """True when sampling reads the request's previous tokens (penalties)."""
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)


def _mask_stops_before_min_tokens(logits: torch.Tensor, requests: list[Request]) -> None:
    for row, req in enumerate(requests):
        p = req.params
        if req.num_output_tokens < p.min_tokens:
            stops = set(p.stop_token_ids)
            if not p.ignore_eos:
                stops.update(req.eos_token_ids)
            stops = {t for t in stops if t < logits.shape[1]}
            if stops:
                logits[row, to_device(sorted(stops), torch.long, logits.device)] = float("-inf")


def has_token_bias(params: SamplingParams) -> bool:
    return bool(params.logit_bias) or params.allowed_token_ids is not None


def _apply_token_bias(logits: torch.Tensor, requests: list[Request]) -> None:
    """logit_bias and allowed_token_ids of every row, in one scatter each: the ids and
    values go up in one small copy, nothing is read back. Ids past the logits' width
    (a tokenizer larger than the model's vocabulary) are no token and are skipped."""
    vocab = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    allow_rows: list[int] = []
    allow_cols: list[int] = []
    allowed: list[int] = []
    for row, req in enumerate(requests):
        p = req.params
        if p.logit_bias:
            for token, bias in p.logit_bias.items():
                if token < vocab:
                    rows.append(row)
                    cols.append(token)
                    vals.append(bias)
        if p.allowed_token_ids is not None:
            allowed.append(row)
            ids = [t for t in p.allowed_token_ids if t < vocab]
            allow_rows.extend([len(allowed) - 1] * len(ids))
            allow_cols.extend(ids)
    device = logits.device
    if rows:
        index = to_device([rows, cols], torch.long, device)
        logits.index_put_((index[0], index[1]), to_device(vals, logits.dtype, device), accumulate=True)
    if allowed:
        banned = torch.ones(len(allowed), vocab, dtype=torch.bool, device=device)
        index = to_device([allow_rows, allow_cols], torch.long, device)
        banned[index[0], index[1]] = False
        targets = to_device(allowed, torch.long, device)
        logits[targets] = logits[targets].masked_fill(banned, float("-inf"))


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Apply top-k, top-p and min-p (rows where they are off pass through unchanged)."""
    device = logits.device
    vocab = logits.shape[1]
    if any(0 < p.top_k < vocab for p in params) or any(p.top_p < 1.0 for p in params):
        top_k = to_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long, device)
        top_p = to_device([p.top_p for p in params], logits.dtype, device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        drop = ranks >= top_k.unsqueeze(1)
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it stays).
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p.unsqueeze(1)
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if any(p.min_p > 0 for p in params):
        min_p = to_device([p.min_p for p in params], logits.dtype, device)
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


class Sampler:
    def __init__(self, device: str, seed: int) -> None:
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)

    def request_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def sample(self, logits: torch.Tensor, requests: list[Request], mask: TokenMask | None = None) -> PendingSample:
        """logits: [B, V], one row per request (modified in place): float32, or the
        model's dtype, which is cast here unless every row is a plain greedy argmax.
        `mask`: the grammar masks of constrained rows (structured outputs), applied
        first, so the reported logprobs, penalties and filters all see only tokens the
        grammar allows (as vLLM does)."""
        params = [r.params for r in requests]
        if logits.dtype != torch.float32 and (mask is not None or not all(_argmax_only(r) for r in requests)):
            logits = logits.float()
        if mask is not None:
            mask.apply(logits)
        lp_k = [p.logprobs for p in params]
        raw_logprobs = logits.log_softmax(dim=-1) if any(k is not None for k in lp_k) else None

        if any(needs_history(p) for p in params):
            _apply_penalties(logits, requests)
        if any(has_token_bias(p) for p in params):
            _apply_token_bias(logits, requests)
        if any(r.num_output_tokens < r.params.min_tokens for r in requests):
            _mask_stops_before_min_tokens(logits, requests)

        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            all_random = len(random_rows) == len(requests)
            sub = logits if all_random else logits[to_device(random_rows, torch.long, logits.device)]
            temps = to_device([params[i].temperature for i in random_rows], logits.dtype, logits.device)
            probs = _filter(sub / temps.unsqueeze(1), [params[i] for i in random_rows]).softmax(dim=-1)
            noise = torch.empty_like(probs)
            seeded = [j for j, i in enumerate(random_rows) if requests[i].generator is not None]
            if len(seeded) < len(random_rows):
                noise.exponential_(generator=self._generator)  # one launch for the unseeded rows
            for j in seeded:  # seeded rows draw from their own stream, batch-independent
                noise[j].exponential_(generator=requests[random_rows[j]].generator)
            picked = (probs / noise).argmax(dim=-1)
            if all_random:
                tokens = picked
            else:
                tokens[to_device(random_rows, torch.long, logits.device)] = picked

        logprobs = None
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
            ranks = (raw_logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
            k_max = max((k for k in lp_k if k), default=0)
            top_vals, top_ids = raw_logprobs.topk(k_max, dim=-1) if k_max else (chosen[:, None][:, :0], tokens[:, None][:, :0])
            logprobs = tuple(_to_host(t) for t in (chosen, ranks, top_ids, top_vals))
        host_tokens = _to_host(tokens)
        event = None
        if logits.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return PendingSample(tokens, host_tokens, logprobs, lp_k, event)  # type: ignore[arg-type]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], k: int) -> list[LogprobRow]:
    """Logprob (and top-k) of each next prompt token given the logits of its predecessor."""
    lp = logits.log_softmax(dim=-1)
    ids = torch.tensor(next_ids, device=logits.device)
    chosen = lp.gather(1, ids.unsqueeze(1)).squeeze(1)
    ranks = (lp > chosen.unsqueeze(1)).sum(dim=-1) + 1
    top_vals, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    return [
        (float(c), int(r), t.tolist(), v.tolist())
        for c, r, t, v in zip(chosen.tolist(), ranks.tolist(), top_ids, top_vals, strict=True)
    ]
