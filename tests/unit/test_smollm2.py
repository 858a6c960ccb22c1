"""The embedded default model end to end: converted from its GGUF, chatting through its
template, token for token equal to HF transformers on the same converted weights."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM

from rtpllm import LLM, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> LLM:
    return LLM("smollm2-135m-instruct", device="cpu")


def test_answers_paris(smollm2: LLM) -> None:
    out = smollm2.chat(QUESTION, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_greedy_tokens_equal_transformers(smollm2: LLM) -> None:
    tok = smollm2.get_tokenizer()
    assert tok is not None
    prompts = [
        tok.encode_chat(QUESTION),
        tok.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}]),
        tok.encode("The three primary colors are"),
    ]
    ours = smollm2.generate(prompts, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(smollm2.engine.model_dir, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, ours, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 48)


def hf_greedy(hf: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Plain argmax decoding with HF's cache, not stopping at EOS (as ignore_eos does)."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    past = None
    # transformers renamed the KV cache argument and output field to `cache` (5.25 warns
    # on `past_key_values`; the GPU machine's 5.17 knows only the old names).
    new_api = "cache" in inspect.signature(hf.forward).parameters
    with torch.no_grad():
        for _ in range(steps):
            res = hf(ids, use_cache=True, **({"cache": past} if new_api else {"past_key_values": past}))
            past = res.cache if new_api else res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out
