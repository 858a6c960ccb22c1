"""Verification of drafts: greedy longest match, exact rejection sampling (checked
against the target distribution with a chi-square test a biased verifier fails),
per-row min_tokens, seeds and logprobs."""

from __future__ import annotations

import pytest
import torch

from rtpllm.engine.request import Request
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative import verify as verify_mod
from rtpllm.speculative.verify import SpecRows, verify

VOCAB = 6


def request(params: SamplingParams, rid: str = "r", seed: int | None = None) -> Request:
    req = Request(request_id=rid, prompt_token_ids=[1, 2, 3], params=params, eos_token_ids=(5,), max_model_len=100)
    if seed is not None:
        req.generator = torch.Generator().manual_seed(seed)
    return req


def chi_square_p(observed: list[int], expected_probs: torch.Tensor) -> float:
    """One-sample chi-square p-value (cells with expected count >= 5 kept, the rest pooled)."""
    n = sum(observed)
    obs = torch.tensor(observed, dtype=torch.float64)
    exp = expected_probs.double() * n
    keep = exp >= 5
    obs = torch.cat([obs[keep], obs[~keep].sum().reshape(1)]) if (~keep).any() else obs
    exp = torch.cat([exp[keep], exp[~keep].sum().reshape(1)]) if (~keep).any() else exp
    mask = exp > 0
    stat = float(((obs[mask] - exp[mask]) ** 2 / exp[mask]).sum())
    df = int(mask.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def test_greedy_accepts_the_longest_matching_prefix() -> None:
    targets = [2, 4, 1, 3]  # argmax of each of the k + 1 rows
    logits = torch.full((4, VOCAB), -1.0)
    logits[torch.arange(4), torch.tensor(targets)] = 3.0
    req = request(SamplingParams(temperature=0, max_tokens=50))
    got = verify(logits.clone(), [SpecRows(req, (2, 4, 0))], torch.Generator())
    assert got[0].tokens == [2, 4, 1] and got[0].num_accepted == 2
    got = verify(logits.clone(), [SpecRows(req, (2, 4, 1))], torch.Generator())
    assert got[0].tokens == [2, 4, 1, 3] and got[0].num_accepted == 3  # the bonus token
    got = verify(logits.clone(), [SpecRows(req, (0, 4, 1))], torch.Generator())
    assert got[0].tokens == [2] and got[0].num_accepted == 0


def test_min_tokens_masks_stop_tokens_row_by_row() -> None:
    """Row i is the (outputs + i)-th token: EOS is banned only while that is below min_tokens."""
    logits = torch.zeros(3, VOCAB)
    logits[:, 5] = 10.0  # EOS is everyone's favourite
    logits[:, 2] = 5.0
    req = request(SamplingParams(temperature=0, max_tokens=50, min_tokens=2))
    req.append_output(2)  # one output so far: rows 0 and 1 are outputs 2 and 3
    got = verify(logits, [SpecRows(req, (2, 2))], torch.Generator())
    # Row 0 (output 2) may not end; row 1 (output 3) may.
    assert got[0].tokens == [2, 5]


def _emitted_first_tokens(p: torch.Tensor, draft_probs: torch.Tensor | None, trials: int, seed: int) -> list[int]:
    """Run `trials` independent verifications of 2 drafts over the same target rows and
    count the first emitted token (it must be distributed as p[0] exactly)."""
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=1.0, max_tokens=50)
    batch: list[SpecRows] = []
    for i in range(trials):
        if draft_probs is None:
            draft = (3, 3)  # a model-free proposer: a point mass
            q = None
        else:
            draft = tuple(int(torch.multinomial(draft_probs[j], 1, generator=g)) for j in range(2))
            q = draft_probs
        batch.append(SpecRows(request(params, f"r{i}"), draft, q))
    logits = p.log().repeat(trials, 1)  # every request sees the same 3 rows
    out = verify(logits, batch, g)
    counts = [0] * VOCAB
    for v in out:
        counts[v.tokens[0]] += 1
    return counts


P = torch.tensor(
    [
        [0.30, 0.05, 0.15, 0.25, 0.10, 0.15],
        [0.10, 0.20, 0.20, 0.10, 0.30, 0.10],
        [0.05, 0.05, 0.50, 0.20, 0.10, 0.10],
    ]
)
Q = torch.tensor(
    [
        [0.10, 0.10, 0.10, 0.50, 0.10, 0.10],
        [0.30, 0.10, 0.10, 0.30, 0.10, 0.10],
    ]
)


@pytest.mark.parametrize("with_q", [False, True], ids=["point-mass", "draft-distribution"])
def test_rejection_sampling_is_exact(with_q: bool) -> None:
    counts = _emitted_first_tokens(P, Q if with_q else None, 6000, seed=7)
    assert chi_square_p(counts, P[0]) > 1e-3


def test_a_biased_verifier_fails_the_same_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """The classic bug: on rejection, resample from p instead of the residual (which
    over-weights the rejected draft). The test above must catch it."""
    monkeypatch.setattr(verify_mod, "residual", lambda probs, draft, q: probs)
    counts = _emitted_first_tokens(P, None, 6000, seed=7)
    assert chi_square_p(counts, P[0]) < 1e-6


def test_seeded_requests_draw_from_their_own_generator() -> None:
    params = SamplingParams(temperature=1.0, max_tokens=50, seed=3)
    logits = P.log()

    def once(extra: int) -> list[int]:
        batch = [SpecRows(request(params, "a", seed=3), (3, 3))]
        batch += [SpecRows(request(SamplingParams(temperature=1.0), f"o{i}"), (1, 1)) for i in range(extra)]
        rows = torch.cat([logits] * (1 + extra))
        return verify(rows, batch, torch.Generator().manual_seed(extra))[0].tokens

    assert once(0) == once(3) == once(7)


def test_logprobs_are_the_raw_model_logprobs_of_each_emitted_token() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    raw = logits.log_softmax(-1)
    targets = logits.argmax(-1).tolist()
    req = request(SamplingParams(temperature=0, max_tokens=50, logprobs=2))
    out = verify(logits.clone(), [SpecRows(req, (targets[0], (targets[1] + 1) % VOCAB))], torch.Generator())[0]
    assert out.tokens == [targets[0], targets[1]]
    for row, (token, lp) in enumerate(zip(out.tokens, out.logprobs, strict=True)):
        assert lp is not None
        chosen, rank, top_ids, top_vals = lp
        assert chosen == pytest.approx(float(raw[row, token]))
        assert rank == 1
        assert top_ids == raw[row].topk(2).indices.tolist()
        assert top_vals == pytest.approx(raw[row].topk(2).values.tolist())
