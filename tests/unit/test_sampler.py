"""The sampler's filters and penalties against HF transformers' logits processors, and
its sampling distribution against the target probabilities."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rtpllm.engine.request import Request
from rtpllm.engine.sampler import Sampler, _apply_penalties, _filter
from rtpllm.sampling_params import SamplingParams

V = 50


def finite_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x)


@pytest.mark.parametrize("top_k", [1, 5, 49])
def test_top_k_matches_hf(top_k: int) -> None:
    logits = torch.randn(4, V)
    ours = _filter(logits.clone(), [SamplingParams(top_k=top_k)] * 4)
    ref = TopKLogitsWarper(top_k)(None, logits.clone())
    assert torch.equal(finite_mask(ours), finite_mask(ref))


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(top_p: float) -> None:
    logits = torch.randn(4, V) * 3
    ours = _filter(logits.clone(), [SamplingParams(top_p=top_p)] * 4)
    ref = TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(finite_mask(ours), finite_mask(ref))


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_matches_hf(min_p: float) -> None:
    logits = torch.randn(4, V) * 3
    ours = _filter(logits.clone(), [SamplingParams(min_p=min_p)] * 4)
    ref = MinPLogitsWarper(min_p)(None, logits.clone())
    assert torch.equal(finite_mask(ours), finite_mask(ref))


def test_mixed_rows_filter_independently() -> None:
    logits = torch.randn(3, V)
    params = [SamplingParams(top_k=3), SamplingParams(), SamplingParams(top_p=0.5)]
    ours = _filter(logits.clone(), params)
    assert finite_mask(ours[0]).sum() == 3
    assert finite_mask(ours[1]).all()
    assert torch.equal(finite_mask(ours[2]), finite_mask(TopPLogitsWarper(0.5)(None, logits[2:3].clone())[0]))


def _req(prompt: list[int], outputs: list[int], **kw) -> Request:
    r = Request("r", prompt, SamplingParams(**kw))
    for t in outputs:
        r.append_output(t)
    return r


def test_repetition_penalty_matches_hf() -> None:
    logits = torch.randn(1, V)
    req = _req([1, 2, 3], [3, 4, 4], repetition_penalty=1.3)
    ours = logits.clone()
    _apply_penalties(ours, [req])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([req.all_token_ids]), logits.clone())
    torch.testing.assert_close(ours, ref)


def test_presence_and_frequency_penalties_follow_openai_formula() -> None:
    logits = torch.zeros(1, V)
    req = _req([7, 7, 7], [4, 4, 5], presence_penalty=0.5, frequency_penalty=0.25)
    _apply_penalties(logits, [req])
    assert logits[0, 4].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert logits[0, 5].item() == pytest.approx(-(0.5 + 0.25))
    assert logits[0, 7].item() == 0.0  # prompt tokens are not penalised by these two


def test_sampling_follows_the_distribution() -> None:
    sampler = Sampler("cpu", seed=0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    target = logits.softmax(-1)[0]
    counts = torch.zeros(4)
    for _ in range(4000):
        req = Request("r", [0], SamplingParams(temperature=1.0))
        counts[sampler.sample(logits.clone(), [req]).resolve()[0][0]] += 1
    freq = counts / counts.sum()
    assert (freq - target).abs().max() < 0.03


def test_temperature_sharpens() -> None:
    sampler = Sampler("cpu", seed=0)
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    hot = sum(sampler.sample(logits.clone(), [Request("r", [0], SamplingParams(temperature=2.0))]).resolve()[0][0] == 0 for _ in range(2000))
    cold = sum(sampler.sample(logits.clone(), [Request("r", [0], SamplingParams(temperature=0.2))]).resolve()[0][0] == 0 for _ in range(2000))
    assert cold > hot + 400


def _rows_of_every_kind() -> list[Request]:
    return [
        _req([1], [], temperature=0),
        _req([1], [], temperature=0, logprobs=2),
        _req([1, 2, 3], [3, 4], temperature=0, repetition_penalty=1.5),
        _req([1], [], temperature=0, logit_bias={5: 3.0}),
        _req([1], [], temperature=0, min_tokens=2, stop_token_ids=[7]),
        _req([1], [], temperature=0.8, top_p=0.9, seed=3),
    ]


@pytest.mark.parametrize("kinds", [[0], [0, 0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [0, 5], [0, 1, 2, 3, 4, 5]])
def test_bf16_logits_sample_as_their_float32_copy(kinds: list[int]) -> None:
    """The engine hands the sampler the model's bf16 logits (ModelRunner.native_logits):
    a plain greedy batch takes the argmax on them, anything else their float32 copy. Both
    must pick the tokens, and report the logprobs, that float32 logits give."""
    torch.manual_seed(0)
    logits = (torch.randn(len(kinds), V) * 4).to(torch.bfloat16)
    logits[:, 5] = logits[:, 6]  # a tie: the first index wins either way
    results = []
    for batch in (logits.clone(), logits.float()):
        reqs = [_rows_of_every_kind()[k] for k in kinds]
        results.append(Sampler("cpu", seed=0).sample(batch, reqs).resolve())
    assert results[0] == results[1]


def test_a_plain_greedy_batch_is_not_cast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of native logits: a [256, 151936] float32 copy and its argmax cost ~2.6%
    of a Qwen3-0.6B batch-256 decode step on an H100 (docs/benchmarks.md)."""
    logits = torch.randn(3, V).to(torch.bfloat16)
    expected = logits.float().argmax(-1)
    reqs = [_req([1], [], temperature=0) for _ in range(3)]

    def no_cast(self: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a plain greedy batch was cast to float32")

    monkeypatch.setattr(torch.Tensor, "float", no_cast)
    out = Sampler("cpu", seed=0).sample(logits, reqs)
    monkeypatch.undo()
    assert torch.equal(out.tokens, expected)
    # One row that needs more than the argmax makes it cast.
    monkeypatch.setattr(torch.Tensor, "float", no_cast)
    with pytest.raises(AssertionError, match="cast"):
        Sampler("cpu", seed=0).sample(logits, [*reqs, _req([1], [], temperature=0, logprobs=1)])
