"""Structured outputs on CUDA: masks applied on the device equal the CPU reference, and
with async scheduling (CUDA's default: the grammar worker waits for the in-flight
step's tokens itself) outputs equal synchronous scheduling's, CUDA graphs on, with
constrained, unconstrained and n > 1 requests batched together."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rtpllm import LLM, SamplingParams, StructuredOutputsParams
from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.structured.bitmask import apply_token_bitmask

pytestmark = pytest.mark.gpu

REGEX = r"[a-z]{2,6}-[0-9]{1,3}"


def test_device_masks_equal_the_cpu_reference(cuda_device: str) -> None:
    bits = torch.from_numpy(
        np.random.default_rng(0).integers(-(2**31), 2**31, size=(5, 40), dtype=np.int64).astype(np.int32)
    )
    for vocab in (1270, 1290):  # the 1280 bits cover more, then fewer, than the logits
        logits = torch.randn(8, vocab)
        expected = logits.clone()
        apply_token_bitmask(expected, bits, [7, 1, 2, 5, 0])
        on_device = logits.to(cuda_device)
        apply_token_bitmask(on_device, bits.pin_memory(), [7, 1, 2, 5, 0])
        assert torch.equal(on_device.cpu(), expected)


def test_async_equals_sync_on_cuda(cuda_device: str, tmp_path: Path) -> None:
    model = write_random_checkpoint(tmp_path / "llama", "llama", seed=0)
    kw = dict(device=cuda_device, dtype="float32", num_blocks=64, block_size=16, max_model_len=256)
    sync = LLM(str(model), async_scheduling=False, **kw)  # type: ignore[arg-type]
    asyn = LLM(str(model), async_scheduling=True, **kw)  # type: ignore[arg-type]
    rng = random.Random(0)
    specs = [
        StructuredOutputsParams(regex=REGEX),
        StructuredOutputsParams(choice=["yes", "no", "maybe"]),
        None,
    ]
    prompts = [[rng.randrange(33, 127) for _ in range(rng.randint(3, 60))] for _ in range(24)]
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=24, n=1 + i % 2, structured_outputs=specs[i % 3])
        for i in range(24)
    ]
    a, b = sync.generate(prompts, params), asyn.generate(prompts, params)
    assert [[(o.token_ids, o.finish_reason) for o in r.outputs] for r in a] == [
        [(o.token_ids, o.finish_reason) for o in r.outputs] for r in b
    ]
    for p, r in zip(params, b, strict=True):
        for o in r.outputs:
            if p.structured_outputs is not None and p.structured_outputs.regex is not None:
                assert re.fullmatch(REGEX, o.text), o.text
            elif p.structured_outputs is not None:
                assert o.text in ("yes", "no", "maybe")
