"""logit_bias and allowed_token_ids in the sampler: applied on the logits' device, per
row, after the raw logprobs (which stay the model's) and before min_tokens masking."""

from __future__ import annotations

import pytest
import torch

from rtpllm.engine.request import Request
from rtpllm.engine.sampler import Sampler
from rtpllm.protocol.convert import params_from_spec, spec_from_params
from rtpllm.protocol.messages import SamplingSpec, decode, encode
from rtpllm.sampling_params import SamplingParams

V = 32
# On the GPU too where there is one: the bias is applied on the logits' device.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def sample(logits: torch.Tensor, *params: SamplingParams) -> tuple[list[int], list]:
    requests = [Request(f"r{i}", [0], p) for i, p in enumerate(params)]
    sampler = Sampler(str(logits.device), 0)
    for r in requests:
        if r.params.seed is not None:
            r.generator = sampler.request_generator(r.params.seed)
    return sampler.sample(logits.clone(), requests).resolve()


@pytest.mark.parametrize("device", DEVICES)
def test_bias_forces_and_bans_tokens_per_row(device: str) -> None:
    logits = torch.randn(3, V, device=device)
    best = int(logits[0].argmax())
    forced = (best + 5) % V
    tokens, _ = sample(
        logits,
        SamplingParams(temperature=0, logit_bias={forced: 100.0}),
        SamplingParams(temperature=0, logit_bias={int(logits[1].argmax()): -100.0}),
        SamplingParams(temperature=0),  # untouched by its neighbours' biases
    )
    assert tokens[0] == forced
    assert tokens[1] != int(logits[1].argmax())
    assert tokens[2] == int(logits[2].argmax())


@pytest.mark.parametrize("device", DEVICES)
def test_bias_with_sampling_and_raw_logprobs(device: str) -> None:
    logits = torch.randn(1, V, device=device)
    forced = int(logits[0].argmin())
    for seed in range(5):
        tokens, rows = sample(
            logits, SamplingParams(temperature=1.0, seed=seed, logit_bias={forced: 100.0}, logprobs=1)
        )
        assert tokens == [forced]
    # The reported logprob is the model's own, not the biased one.
    assert rows[0][0] == pytest.approx(float(logits[0].log_softmax(-1)[forced]), abs=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_allowed_token_ids_restrict_sampling(device: str) -> None:
    logits = torch.randn(2, V, device=device)
    allowed = [3, 7, 11]
    for seed in range(10):
        tokens, _ = sample(
            logits, SamplingParams(seed=seed, allowed_token_ids=allowed), SamplingParams(seed=seed)
        )
        assert tokens[0] in allowed
    greedy, _ = sample(logits, SamplingParams(temperature=0, allowed_token_ids=allowed))
    assert greedy[0] == max(allowed, key=lambda t: float(logits[0, t]))


def test_min_tokens_wins_over_a_bias_towards_eos() -> None:
    logits = torch.zeros(1, V)
    req = Request(
        "r", [0], SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[4], logit_bias={4: 100.0})
    )
    token = Sampler("cpu", 0).sample(logits.clone(), [req]).resolve()[0][0]
    assert token != 4


def test_bias_validation_and_wire_round_trip() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 100.5})
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    params = SamplingParams(logit_bias={5: -3.5, 9: 100.0}, allowed_token_ids=[5, 9])
    wire = decode(encode(spec_from_params(params)), SamplingSpec)
    back = params_from_spec(wire)
    assert back.logit_bias == {5: -3.5, 9: 100.0} and back.allowed_token_ids == [5, 9]
