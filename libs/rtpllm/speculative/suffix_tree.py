"""A depth-bounded suffix trie with occurrence counts: the data structure of suffix
decoding.

Every suffix of the indexed sequences is inserted up to `depth` tokens, so a node is a
substring of length <= depth and its count is how often that substring occurs. Given a
context, the deepest node matching the context's tail is the longest earlier match;
its children, weighted by count, are the empirical distribution of what came next.
Appending a token costs O(depth): the nodes of the last `depth` suffixes are kept.
"""

from __future__ import annotations

from collections.abc import Sequence


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _Node] = {}


class SuffixTrie:
    """Counts of every substring of length <= `depth` of the sequences added to it."""

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"suffix trie depth must be >= 1, got {depth}")
        self.depth = depth
        self.root = _Node()

    def add(self, tokens: Sequence[int], weight: int = 1) -> None:
        """Index one whole sequence (weight -1 removes a sequence added before)."""
        stream = self.stream()
        for token in tokens:
            stream.append(token, weight)

    def stream(self) -> TrieStream:
        """An appender that indexes one growing sequence token by token."""
        return TrieStream(self)

    def match(self, context: Sequence[int], max_len: int) -> tuple[_Node | None, int]:
        """The node of the longest tail of `context` (at most `max_len` tokens, and
        less than the depth, so it can have children) found in the trie, and its length;
        (None, 0) when not even the last token occurs."""
        longest = min(max_len, self.depth - 1, len(context))
        for length in range(longest, 0, -1):
            node: _Node | None = self.root
            for token in context[len(context) - length :]:
                node = node.children.get(token)
                if node is None:
                    break
            if node is not None and node.children:
                return node, length
        return None, 0

    def continuation(self, node: _Node, k: int, min_confidence: float) -> tuple[list[int], list[float]]:
        """Follow the most frequent child from `node` while the running product of the
        children's shares (the estimated chance that every token so far is right) stays
        at or above `min_confidence`; at most k tokens. Returns the tokens and each
        one's conditional share."""
        tokens: list[int] = []
        shares: list[float] = []
        joint = 1.0
        while len(tokens) < k and node.children:
            token, child = max(node.children.items(), key=lambda kv: kv[1].count)
            # The node's own count includes occurrences at the very end of a sequence,
            # which continue with nothing: they lower the share, as they should.
            share = child.count / max(node.count, 1)
            if joint * share < min_confidence:
                break
            joint *= share
            tokens.append(token)
            shares.append(share)
            node = child
        return tokens, shares


class TrieStream:
    """Appends tokens of one sequence to a trie, keeping the nodes of its open suffixes."""

    def __init__(self, trie: SuffixTrie) -> None:
        self.trie = trie
        self._open: list[_Node] = []  # nodes of the suffixes that can still grow
        self.length = 0

    def append(self, token: int, weight: int = 1) -> None:
        trie = self.trie
        nxt: list[_Node] = []
        for node in [*self._open, trie.root]:
            child = node.children.get(token)
            if child is None:
                if weight < 0:
                    continue  # removing what was never added (capped sequences)
                child = node.children[token] = _Node()
            child.count += weight
            if child.count <= 0:
                # Every occurrence is gone, so are those of its extensions: drop the subtree.
                del node.children[token]
                continue
            nxt.append(child)
        # A suffix whose node is at full depth stops growing.
        self._open = nxt[-(trie.depth - 1) :] if trie.depth > 1 else []
        self.length += 1
