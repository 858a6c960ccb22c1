"""N-gram (prompt lookup) proposer: find the latest earlier occurrence of the
sequence's last n tokens (longest n first) and propose the tokens that followed it.

Strong where outputs copy their input: code editing, summaries, extraction. The index
of each request is kept incrementally (one dict per n mapping an n-gram to where its
latest occurrence ends), so a proposal costs O(max_n) dict lookups, not a scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rtpllm.speculative.proposer import NO_PROPOSAL, Proposal, Proposer


@dataclass
class _Index:
    # by_n[n - min_n]: n-gram -> end (exclusive) of its latest indexed occurrence.
    by_n: list[dict[tuple[int, ...], int]]
    # N-grams ending at positions < indexed_end are in the index.
    indexed_end: int = 0
    tokens: list[int] = field(default_factory=list)


class NgramProposer(Proposer):
    """Prompt lookup over the request's own prompt and outputs."""

    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self._indexes: dict[str, _Index] = {}

    def propose(self, request_id: str, tokens: Sequence[int], k: int, private: bool = False) -> Proposal:
        if k <= 0 or len(tokens) < self.min_n + 1:
            return NO_PROPOSAL
        index = self._indexes.get(request_id)
        if index is None or len(index.tokens) > len(tokens):  # new, or restarted (preemption keeps tokens)
            index = self._indexes[request_id] = _Index([{} for _ in range(self.max_n - self.min_n + 1)])
        index.tokens.extend(tokens[len(index.tokens) :])
        toks = index.tokens
        # Index every n-gram ending before the last token: the suffix itself must not
        # match its own occurrence.
        for end in range(max(index.indexed_end, self.min_n), len(toks)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                index.by_n[n - self.min_n][tuple(toks[end - n : end])] = end
        index.indexed_end = max(index.indexed_end, len(toks))
        for n in range(min(self.max_n, len(toks) - 1), self.min_n - 1, -1):
            end = index.by_n[n - self.min_n].get(tuple(toks[len(toks) - n :]))
            if end is not None:
                follow = tuple(toks[end : end + k])
                if follow:
                    return Proposal(follow, (1.0,) * len(follow))
        return NO_PROPOSAL

    def forget(self, request_id: str, output_tokens: Sequence[int] | None = None) -> None:
        self._indexes.pop(request_id, None)
