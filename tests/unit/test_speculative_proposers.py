"""Proposers: n-gram lookup and suffix decoding, checked against brute force."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtpllm.speculative.ngram import NgramProposer
from rtpllm.speculative.proposer import build_proposer
from rtpllm.speculative.suffix import SuffixProposer
from rtpllm.speculative.suffix_tree import SuffixTrie

seqs = st.lists(st.integers(0, 4), min_size=1, max_size=60)


def brute_ngram(tokens: list[int], k: int, min_n: int, max_n: int) -> tuple[int, ...]:
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        tail = tokens[-n:]
        for end in range(len(tokens) - 1, n - 1, -1):  # latest earlier occurrence first
            if tokens[end - n : end] == tail:
                return tuple(tokens[end : end + k])
    return ()


@given(seqs, st.integers(1, 5))
def test_ngram_matches_brute_force_incrementally(tokens: list[int], k: int) -> None:
    proposer = NgramProposer(min_n=1, max_n=3)
    for length in range(1, len(tokens) + 1):  # the index grows with the sequence
        got = proposer.propose("r", tokens[:length], k).tokens
        assert got == brute_ngram(tokens[:length], k, 1, 3)


def test_ngram_prefers_the_longest_match() -> None:
    proposer = NgramProposer(min_n=1, max_n=3)
    tokens = [1, 2, 3, 9, 8, 2, 3, 7, 1, 2, 3]
    # "2 3" occurs twice before, "1 2 3" once (followed by 9): the longest wins.
    assert proposer.propose("r", tokens, 2).tokens == (9, 8)
    assert proposer.propose("x", [5, 6, 7], 3).tokens == ()  # nothing repeats


def test_ngram_forget_and_restart() -> None:
    proposer = NgramProposer(min_n=1, max_n=2)
    assert proposer.propose("r", [1, 2, 1], 2).tokens == (2, 1)
    proposer.forget("r")
    assert proposer.propose("r", [3, 4, 3], 1).tokens == (4,)


def brute_counts(seqs_: list[list[int]], depth: int) -> Counter[tuple[int, ...]]:
    counts: Counter[tuple[int, ...]] = Counter()
    for s in seqs_:
        for i in range(len(s)):
            for j in range(i + 1, min(i + depth, len(s)) + 1):
                counts[tuple(s[i:j])] += 1
    return counts


def trie_counts(trie: SuffixTrie) -> Counter[tuple[int, ...]]:
    out: Counter[tuple[int, ...]] = Counter()
    stack = [((), trie.root)]
    while stack:
        path, node = stack.pop()
        for token, child in node.children.items():
            out[(*path, token)] = child.count
            stack.append(((*path, token), child))
    return out


@given(st.lists(seqs, min_size=1, max_size=4), st.integers(1, 6))
def test_suffix_trie_counts_every_substring(sequences: list[list[int]], depth: int) -> None:
    trie = SuffixTrie(depth)
    for s in sequences:
        trie.add(s)
    assert trie_counts(trie) == brute_counts(sequences, depth)
    # Removing a sequence leaves exactly the others' counts.
    trie.add(sequences[0], weight=-1)
    assert trie_counts(trie) == brute_counts(sequences[1:], depth)


def test_suffix_proposal_length_follows_confidence() -> None:
    proposer = SuffixProposer(depth=8, min_confidence=0.3, max_spec_factor=4.0)
    # "1 2" was followed by "3 4 5 6" twice: a confident, long proposal.
    firm = [1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    assert proposer.propose("a", firm, 8).tokens == (3, 4, 5, 6, 0, 1, 2)
    # "1 2" was followed by four different tokens: no continuation is likely enough.
    loose = [1, 2, 3, 0, 1, 2, 4, 0, 1, 2, 5, 0, 1, 2, 6, 0, 1, 2]
    assert proposer.propose("b", loose, 8).tokens == ()
    # Shares are conditional frequencies: "2 -> 3" seen 2 of 3 times "1 2" occurs.
    p = proposer.propose("c", [1, 2, 3, 9, 1, 2, 3, 8, 1, 2], 1)
    assert p.tokens == (3,) and p.confidence[0] == pytest.approx(2 / 3)


def test_suffix_global_trie_learns_finished_outputs_but_not_for_private_requests() -> None:
    proposer = SuffixProposer(depth=8)
    proposer.forget("done", [50, 51, 52, 53, 54])
    prompt = [9, 50, 51]  # this request has never seen what follows "50 51"
    assert proposer.propose("new", prompt, 3).tokens == (52, 53, 54)
    assert proposer.propose("seeded", prompt, 3, private=True).tokens == ()


def test_suffix_global_trie_is_bounded() -> None:
    proposer = SuffixProposer(depth=4, global_tokens=10)
    for i in range(5):
        proposer.forget(str(i), [100 + i] * 4)
    assert trie_counts(proposer.global_trie) == brute_counts([[103] * 4, [104] * 4], 4)


def test_registry() -> None:
    assert build_proposer("ngram").name == "ngram"
    assert build_proposer("suffix").name == "suffix"
    with pytest.raises(ValueError, match="ngram"):
        build_proposer("medusa")
    with pytest.raises(ValueError, match="built by the engine"):
        build_proposer("eagle")  # loaded with the target (EagleProposer.load)
