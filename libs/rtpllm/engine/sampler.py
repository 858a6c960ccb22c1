"""Turns a batch of logits into next tokens (and their logprobs).

Order of operations per row: raw logprobs (what the API reports), penalties
(repetition on prompt+output, presence/frequency on output), min_tokens masking of stop
tokens, then greedy argmax or temperature -> top-k -> top-p -> min-p -> sampling.

Sampling draws one exponential per vocabulary entry and takes argmax(p / e), which
samples from p exactly; a request with a seed draws from its own generator, so its
tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtpllm.engine.request import Request
from rtpllm.sampling_params import SamplingParams


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: (sampled logprob, sampled rank, top ids, top logprobs) when requested.
    logprobs: list[tuple[float, int, list[int], list[float]] | None]


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    for row, req in enumerate(requests):
        p = req.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.all_token_ids)), device=logits.device, dtype=torch.long)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
            out = torch.tensor(req.output_token_ids, device=logits.device, dtype=torch.long)
            counts = torch.zeros(logits.shape[1], device=logits.device, dtype=logits.dtype)
            counts.scatter_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _mask_stops_before_min_tokens(logits: torch.Tensor, requests: list[Request]) -> None:
    for row, req in enumerate(requests):
        p = req.params
        if req.num_output_tokens < p.min_tokens:
            stops = set(p.stop_token_ids)
            if not p.ignore_eos:
                stops.update(req.eos_token_ids)
            stops = {t for t in stops if t < logits.shape[1]}
            if stops:
                logits[row, list(stops)] = float("-inf")


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Apply top-k, top-p and min-p (rows where they are off pass through unchanged)."""
    device = logits.device
    vocab = logits.shape[1]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
    min_p = torch.tensor([p.min_p for p in params], device=device, dtype=logits.dtype)
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        drop = ranks >= top_k.clamp(max=vocab).unsqueeze(1)
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it stays).
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p.unsqueeze(1)
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


class Sampler:
    def __init__(self, device: str, seed: int) -> None:
        self.device = device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)

    def request_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        """logits: [B, V] float32, one row per request (modified in place)."""
        want_logprobs = [r.params.logprobs is not None for r in requests]
        raw_logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None

        _apply_penalties(logits, requests)
        _mask_stops_before_min_tokens(logits, requests)

        params = [r.params for r in requests]
        greedy = [p.greedy for p in params]
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, g in enumerate(greedy) if not g]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            temps = torch.tensor([params[i].temperature for i in random_rows], device=logits.device, dtype=logits.dtype)
            scaled = _filter(logits[rows] / temps.unsqueeze(1), [params[i] for i in random_rows])
            probs = scaled.softmax(dim=-1)
            noise = torch.empty_like(probs)
            for j, i in enumerate(random_rows):
                gen = requests[i].generator or self._generator
                noise[j].exponential_(generator=gen)
            tokens[rows] = (probs / noise).argmax(dim=-1)

        token_list = tokens.tolist()
        logprob_rows: list[tuple[float, int, list[int], list[float]] | None] = [None] * len(requests)
        if raw_logprobs is not None:
            for i, req in enumerate(requests):
                k = req.params.logprobs
                if k is None:
                    continue
                row = raw_logprobs[i]
                chosen = row[token_list[i]]
                rank = int((row > chosen).sum().item()) + 1
                if k > 0:
                    top_vals, top_ids = row.topk(k)
                    top = (top_ids.tolist(), top_vals.tolist())
                else:
                    top = ([], [])
                logprob_rows[i] = (float(chosen.item()), rank, top[0], top[1])
        return SampleResult(token_list, logprob_rows)


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], k: int) -> list[tuple[float, int, list[int], list[float]]]:
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
