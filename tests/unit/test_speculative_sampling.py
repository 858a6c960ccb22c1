"""Sampling exactness of speculative decoding, end to end on a small-vocabulary model:
the distribution of each output position with speculation equals the one without
(two-sample chi-square over thousands of samples, fixed seeds), and the same test
fails a deliberately biased verifier."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from rtpllm.config import EngineConfig, SpeculativeConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative import verify as verify_mod
from rtpllm.speculative.proposer import Proposal, Proposer

VOCAB = 8
SAMPLES = 2000
MAX_TOKENS = 4
PROMPT = [1, 2, 3, 1, 2]
# The p-value under which a position's distributions count as different. Exact
# verification must stay above it at every position; the biased one falls far below.
THRESHOLD = 1e-3


class FixedProposer(Proposer):
    """Proposes a fixed token for each output position: a point-mass proposal, often
    wrong. `tokens[i]` is the guess for output i + 1 (the first comes from prefill)."""

    name = "fixed"

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = tuple(tokens)

    def propose(self, request_id: str, tokens: Sequence[int], k: int, private: bool = False) -> Proposal:
        done = len(tokens) - len(PROMPT)  # outputs so far
        guess = self.tokens[done - 1 : done - 1 + k]
        return Proposal(guess, (1.0,) * len(guess))

    def forget(self, request_id: str, output_tokens: Sequence[int] | None = None) -> None:
        pass


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("v8"), "llama", seed=5, std=0.5, tokenizer=False, vocab_size=VOCAB)


def position_counts(model: Path, draft: Sequence[int] | None, seed: int) -> list[list[int]]:
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=3, adaptive=False) if draft is not None else SpeculativeConfig()
    eng = LLMEngine(EngineConfig(model=str(model), seed=seed, speculative=spec))
    if draft is not None:
        assert eng.speculator is not None
        eng.speculator.proposer = FixedProposer(draft)
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, output_kind="final")
    for i in range(SAMPLES):
        eng.add_request(str(i), PROMPT, params)
    counts = [[0] * VOCAB for _ in range(MAX_TOKENS)]
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                for pos, token in enumerate(out.outputs[0].token_ids):
                    counts[pos][token] += 1
    if draft is not None:
        c = eng.speculator.counters  # type: ignore[union-attr]
        # Drafts were verified, and rejected often enough for the residual to matter.
        assert c.proposed_tokens > SAMPLES and 0.1 * c.proposed_tokens < c.accepted_tokens < 0.9 * c.proposed_tokens
    return counts


def two_sample_p(a: list[int], b: list[int]) -> float:
    """Chi-square test that two equal-size samples come from one distribution."""
    stat, cells = 0.0, 0
    for x, y in zip(a, b, strict=True):
        if x + y:
            stat += (x - y) ** 2 / (x + y)
            cells += 1
    df = torch.tensor((cells - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def reference(small_vocab: Path) -> list[list[int]]:
    return position_counts(small_vocab, None, seed=11)


def drafts_for(reference: list[list[int]]) -> list[int]:
    # Plausible but not certain tokens: the most frequent at outputs 2..4.
    return [max(range(VOCAB), key=lambda t: reference[pos][t]) for pos in range(1, MAX_TOKENS)]


def test_speculative_sampling_matches_plain_sampling(small_vocab: Path, reference: list[list[int]]) -> None:
    spec = position_counts(small_vocab, drafts_for(reference), seed=12)
    for pos in range(MAX_TOKENS):
        assert two_sample_p(reference[pos], spec[pos]) > THRESHOLD, (pos, reference[pos], spec[pos])


def test_a_biased_verifier_fails(small_vocab: Path, reference: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    # Resampling from p instead of the residual after a rejection over-weights drafts.
    monkeypatch.setattr(verify_mod, "residual", lambda probs, draft, q: probs)
    spec = position_counts(small_vocab, drafts_for(reference), seed=12)
    worst = min(two_sample_p(reference[pos], spec[pos]) for pos in range(1, MAX_TOKENS))
    assert worst < THRESHOLD / 10
