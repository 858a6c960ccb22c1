"""Suffix decoding: proposals from suffix tries over the request's own prompt and
outputs and over the recent outputs of finished requests, as many tokens as the
match supports.

Unlike n-gram lookup, which copies whatever followed the latest match, a trie counts
every continuation seen; the proposal follows the most frequent one and stops when the
estimated chance that all proposed tokens are right falls below `min_confidence`, or
past `max_spec_factor` times the match length (a short match predicts little). So the
number of proposed tokens varies with the evidence, from 0 to k.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from rtpllm.speculative.proposer import NO_PROPOSAL, Proposal, Proposer
from rtpllm.speculative.suffix_tree import SuffixTrie, TrieStream


@dataclass
class _Local:
    trie: SuffixTrie
    stream: TrieStream


class SuffixProposer(Proposer):
    """Per-request tries (prompt + outputs) and one global trie of recent outputs."""

    name = "suffix"

    def __init__(
        self,
        depth: int = 24,
        min_confidence: float = 0.1,
        max_spec_factor: float = 2.0,
        global_tokens: int = 1 << 18,
        max_context: int = 8192,
    ) -> None:
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        self.depth = depth
        self.min_confidence = min_confidence
        self.max_spec_factor = max_spec_factor
        self.max_context = max_context  # a request's trie indexes at most its last this many tokens
        self.global_trie = SuffixTrie(depth)
        self.global_tokens = global_tokens  # capacity: outputs kept in the global trie
        self._global_seqs: deque[tuple[int, ...]] = deque()
        self._global_size = 0
        self._local: dict[str, _Local] = {}

    def propose(self, request_id: str, tokens: Sequence[int], k: int, private: bool = False) -> Proposal:
        if k <= 0 or not tokens:
            return NO_PROPOSAL
        local = self._local_for(request_id, tokens)
        best = self._from_trie(local.trie, tokens, k)
        if not private and self._global_seqs:
            other = self._from_trie(self.global_trie, tokens, k)
            if _expected_accepted(other) > _expected_accepted(best):
                best = other
        return best

    def _local_for(self, request_id: str, tokens: Sequence[int]) -> _Local:
        local = self._local.get(request_id)
        if local is None or local.stream.length > len(tokens):
            trie = SuffixTrie(self.depth)
            local = self._local[request_id] = _Local(trie, trie.stream())
            # A very long prompt: index its tail only (bounded memory and build time).
            skip = max(0, len(tokens) - self.max_context)
            local.stream.length = skip
        for token in tokens[local.stream.length :]:
            local.stream.append(token)
        return local

    def _from_trie(self, trie: SuffixTrie, context: Sequence[int], k: int) -> Proposal:
        node, length = trie.match(context, trie.depth - 1)
        if node is None:
            return NO_PROPOSAL
        limit = min(k, math.ceil(self.max_spec_factor * length))
        toks: list[int] = []
        shares: list[float] = []
        joint = 1.0
        while node is not None and len(toks) < limit:
            more, more_shares = trie.continuation(node, limit - len(toks), self.min_confidence / joint)
            if not more:
                break
            toks += more
            shares += more_shares
            for share in more_shares:
                joint *= share
            # The walk ends at the trie's depth: match again on the context grown by
            # the proposal so far, and go on from there.
            node, _ = trie.match([*context[-trie.depth :], *toks], trie.depth - 1)
        if not toks:
            return NO_PROPOSAL
        return Proposal(tuple(toks), tuple(shares))

    def forget(self, request_id: str, output_tokens: Sequence[int] | None = None) -> None:
        self._local.pop(request_id, None)
        if not output_tokens or self.global_tokens <= 0:
            return
        seq = tuple(output_tokens[: self.global_tokens])
        self.global_trie.add(seq)
        self._global_seqs.append(seq)
        self._global_size += len(seq)
        while self._global_size > self.global_tokens:
            old = self._global_seqs.popleft()
            self.global_trie.add(old, weight=-1)
            self._global_size -= len(old)


def _expected_accepted(p: Proposal) -> float:
    """Sum over the proposed tokens of the chance that all up to it are right."""
    total, joint = 0.0, 1.0
    for share in p.confidence:
        joint *= share
        total += joint
    return total
