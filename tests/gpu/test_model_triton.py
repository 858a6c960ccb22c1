"""Whole tiny models on the GPU: greedy tokens with the Triton backend equal the torch
reference backend's, through chunked prefill, decode batches and prefix-cache hits.

Both runs use the same fused small ops (Triton on CUDA), so only attention differs. In
bf16 two implementations may legitimately pick different tokens where the top two logits
are within rounding of each other; such a near-tie ends the comparison of that sequence,
anything else fails.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rtpllm import LLM, SamplingParams
from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.outputs import RequestOutput

pytestmark = pytest.mark.gpu

# Largest top-1 / top-2 logprob gap that counts as a tie, per model dtype. bf16 logits of
# these models are ~8-16, where one bf16 step is 0.0625; two attention implementations
# were seen to diverge at gaps of 0 to 2 steps (interpreter run, 2026). A broken kernel
# diverges early in most sequences, at gaps around the median top-2 gap (~0.6).
TIE_GAP = {"bfloat16": 0.25, "float32": 1e-3}


def _prompts(seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Round one: mixed lengths (some longer than the step's token budget, so chunked).
    Round two: prompts sharing round one's prefixes (prefix-cache hits) plus new ones."""
    rng = random.Random(seed)
    first = [[rng.randrange(3, 256) for _ in range(n)] for n in (1, 5, 17, 40, 130, 300)]
    second = [p[:m] + [rng.randrange(3, 256) for _ in range(9)] for p, m in ((first[4], 96), (first[5], 250))]
    second += [[rng.randrange(3, 256) for _ in range(n)] for n in (3, 64)]
    return first, second


def _run(model_dir: Path, backend: str, dtype: str) -> tuple[list[RequestOutput], list[RequestOutput]]:
    llm = LLM(
        str(model_dir),
        dtype=dtype,
        device="cuda",
        attention_backend=backend,
        max_num_batched_tokens=64,
        block_size=16,
        max_model_len=1024,
        num_blocks=256,
    )
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    first, second = _prompts(0)
    return llm.generate(first, params), llm.generate(second, params)


def _assert_same_greedy(
    ours: list[RequestOutput], ref: list[RequestOutput], dtype: str, tie_gap: float | None = None
) -> None:
    """Greedy tokens equal, except at a near-tie of the reference (top-2 gap at most
    `tie_gap`, by default the dtype's), after which the continuations differ."""
    tie_gap = TIE_GAP[dtype] if tie_gap is None else tie_gap
    for a, b in zip(ours, ref, strict=True):
        got, want = a.outputs[0], b.outputs[0]
        for i, (x, y) in enumerate(zip(got.token_ids, want.token_ids, strict=True)):
            if x == y:
                continue
            assert want.logprobs is not None
            top = sorted((lp.logprob for lp in want.logprobs[i].values()), reverse=True)
            gap = top[0] - top[1] if len(top) > 1 else float("inf")
            assert gap <= tie_gap, f"token {i} differs ({x} vs {y}) with a top-2 gap of {gap:.3g}"
            break  # after a tie the two continuations are different sequences


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {}),
        ("qwen3", {}),
        ("mistral", {"sliding_window": 48}),
    ],
)
def test_triton_backend_greedy_matches_torch(
    cuda_device: str, tmp_path: Path, family: str, overrides: dict[str, int], dtype: str
) -> None:
    model_dir = write_random_checkpoint(
        tmp_path / family, family, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, **overrides
    )
    ours = _run(model_dir, "triton", dtype)
    ref = _run(model_dir, "torch", dtype)
    assert any(o.num_cached_tokens > 0 for o in ours[1]), "round two should hit the prefix cache"
    for a, b in zip(ours, ref, strict=True):
        _assert_same_greedy(a, b, dtype)
    torch.cuda.synchronize()
