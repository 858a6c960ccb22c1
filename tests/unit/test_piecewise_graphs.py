"""Mixed-step graphs' plumbing on the CPU (rtpllm.engine.piecewise_graphs).

CUDA graphs need a GPU (tests/gpu/test_piecewise_cuda.py replays them); here the same
pieces run eagerly through `PiecewiseGraphs.run_eager`: the cuts at each attention call,
attention writing the static output buffer, the recorded per-layer calls (caches, scales, windows)
and the padding to a ladder size. Every step of an engine with mixed batches (chunked
prefill beside decodes, a prefix hit) is run both ways and must agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rtpllm.config import CacheConfig, EngineConfig, SchedulerConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.engine.model_runner import HostBatch
from rtpllm.engine.piecewise_graphs import PiecewiseGraphs, _alias, mixed_graph_tokens, token_ladder
from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.sampling_params import SamplingParams


def test_alias_is_the_same_elements() -> None:
    """What a captured piece's q/k/v are read through at replay: strided views of the qkv
    output (offset into it), the same address, and writes to either show in the other."""
    qkv = torch.randn(5, 3 * 8, dtype=torch.bfloat16)
    k = qkv[:, 8:16].view(5, 2, 4)
    alias = _alias(k)
    assert alias.data_ptr() == k.data_ptr() and alias.shape == k.shape and alias.stride() == k.stride()
    assert torch.equal(alias, k)
    qkv.mul_(2)
    assert torch.equal(alias, k)
    alias[1].zero_()
    assert not qkv[1, 8:16].any() and qkv[1, :8].any()


def test_token_ladder_pads_little() -> None:
    sizes = token_ladder(2048)
    assert sizes[0] == 16 and sizes[-1] == 2048 and sizes == sorted(set(sizes))
    for tokens in range(1, 2049):
        bucket = next(s for s in sizes if s >= tokens)
        assert bucket - tokens <= max(15, tokens // 8), tokens
    assert token_ladder(10) == [10]
    assert token_ladder(100)[-1] == 100


def test_mixed_graph_tokens_follow_the_switches() -> None:
    on = EngineConfig(cuda_graphs=True, mixed_cuda_graphs=True, scheduler=SchedulerConfig(max_num_batched_tokens=512))
    assert mixed_graph_tokens(on) == 512
    assert mixed_graph_tokens(EngineConfig(cuda_graphs=True, scheduler=SchedulerConfig(max_num_batched_tokens=512))) == 512  # on by default
    # ... except with tensor parallelism, unless asked for.
    assert mixed_graph_tokens(EngineConfig(cuda_graphs=True, tensor_parallel_size=2)) == 0
    assert mixed_graph_tokens(EngineConfig(cuda_graphs=True, tensor_parallel_size=2, mixed_cuda_graphs=True)) > 0
    assert mixed_graph_tokens(EngineConfig(cuda_graphs=True, mixed_cuda_graphs=False)) == 0
    assert mixed_graph_tokens(EngineConfig(cuda_graphs=False, mixed_cuda_graphs=True)) == 0


@pytest.mark.parametrize(
    ("family", "overrides", "kv_cache_dtype"),
    [
        ("llama", {}, "auto"),
        ("qwen3", {"tie_word_embeddings": True}, "auto"),  # q/k norm fused into RoPE
        ("mistral", {"sliding_window": 24}, "auto"),
        ("llama", {}, "int8"),  # quantized cache: the calls carry each layer's scales
    ],
)
def test_pieces_compute_the_eager_forward(tmp_path: Path, family: str, overrides: dict, kv_cache_dtype: str) -> None:
    model = write_random_checkpoint(tmp_path / family, family, seed=5, **overrides)
    skip = (0,) if kv_cache_dtype == "int8" else ()  # one bf16-style layer among int8 ones
    engine = LLMEngine(
        EngineConfig(
            model=str(model), device="cpu", dtype="float32", max_model_len=256,
            cache=CacheConfig(num_blocks=96, block_size=8, kv_cache_dtype=kv_cache_dtype, kv_cache_dtype_skip_layers=skip),
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=40),
        )
    )  # fmt: skip
    runner = engine.runner
    pieces = PiecewiseGraphs(runner.model, runner.kv_caches, runner.backend, max_tokens=40, device="cpu")
    steps: list[tuple[int, int]] = []  # (tokens, decode rows) of each compared step
    forward = runner._forward_eager

    def both(batch: HostBatch, fill):  # type: ignore[no-untyped-def]
        hidden, features = forward(batch, fill)
        meta = runner.attention_metadata(batch)
        ids, pos = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.positions)
        # The eager forward stored this step's K/V; storing the same values again is harmless.
        alt = pieces.run_eager(ids, pos, meta)
        torch.testing.assert_close(alt, hidden, rtol=1e-4, atol=1e-4)
        steps.append((len(batch.input_ids), batch.num_decodes))
        return hidden, features

    runner._forward_eager = both  # type: ignore[method-assign]
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 200, 32).tolist()
    prompts = [shared + rng.integers(3, 200, n).tolist() for n in (5, 70, 17)] + [rng.integers(3, 200, 9).tolist()]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine.add_request("first", prompts[0], params)
    for _ in range(3):
        engine.step()
    # The others arrive while the first decodes: steps then mix prefill chunks (the
    # 102-token prompt takes three) with decodes, and "p1" hits the shared prefix.
    for i, prompt in enumerate(prompts[1:], 1):
        engine.add_request(f"p{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
    assert len(pieces.calls) == runner.model.config.num_layers
    mixed = [(t, d) for t, d in steps if 0 < d < t]
    assert mixed, f"no step mixed decodes with a prefill chunk: {steps}"
    assert any(t not in pieces.sizes for t, _ in steps), "no step needed padding"
