"""`best_of` for /v1/completions: the engine samples `best_of` candidates per prompt and
the client gets the `n` with the highest cumulative logprob (the sum of the chosen
tokens' logprobs, as vLLM ranked them), best first.

Selection needs every candidate finished, which is why OpenAI (and this server) refuse
`best_of` with `stream`. The engine reports logprobs for the candidates (with logprobs 0
when the client asked for none), whose running sum each delta carries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from rtpllm.protocol.messages import TokenDelta


async def best_of(
    deltas: AsyncIterator[tuple[int, TokenDelta]], keep: int
) -> AsyncIterator[tuple[int, TokenDelta]]:
    """All of `deltas`, buffered, with each prompt's choices cut to its `keep` best and
    renumbered 0..keep-1 in order of score."""
    buffered: list[tuple[int, TokenDelta]] = []
    scores: dict[tuple[int, int], float] = {}
    async for prompt, delta in deltas:
        buffered.append((prompt, delta))
        for c in delta.choices:
            scores.setdefault((prompt, c.index), float("-inf"))
            if c.cumulative_logprob is not None:
                scores[(prompt, c.index)] = c.cumulative_logprob
    rank = select(scores, keep)
    for prompt, delta in buffered:
        choices = [
            msgspec.structs.replace(c, index=rank[(prompt, c.index)])
            for c in delta.choices
            if (prompt, c.index) in rank
        ]
        yield prompt, msgspec.structs.replace(delta, choices=choices)


def select(scores: dict[tuple[int, int], float], keep: int) -> dict[tuple[int, int], int]:
    """(prompt, candidate) -> its new index, for the `keep` best candidates of each
    prompt (ties: the earlier candidate first)."""
    by_prompt: dict[int, list[int]] = {}
    for prompt, candidate in scores:
        by_prompt.setdefault(prompt, []).append(candidate)
    out: dict[tuple[int, int], int] = {}
    for prompt, candidates in by_prompt.items():
        ranked = sorted(candidates, key=lambda c: (-scores[(prompt, c)], c))
        for new, candidate in enumerate(ranked[:keep]):
            out[(prompt, candidate)] = new
    return out
