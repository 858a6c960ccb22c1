"""Mixed-step CUDA graphs (rtpllm.engine.piecewise_graphs) on a GPU: steps that mix
prefill chunks with decodes replay pieces captured around each layer's attention.

fp32 weights, so greedy argmaxes have no bf16 near-ties between the graphed and eager
paths: greedy outputs with mixed-step graphs equal those without, token for token, with
async scheduling (CUDA's default: input ids patched on the device), chunked prefill,
prefix hits, q/k norm, a sliding window and a quantized cache. Each replayed step's hidden
states also equal the same pieces run eagerly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rtpllm.config import CacheConfig, EngineConfig, SchedulerConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 200, 48).tolist()
    return [shared + rng.integers(3, 200, n).tolist() for n in (5, 150, 30, 300)] + [rng.integers(3, 200, 9).tolist()]


def _run(model: Path, device: str, mixed: bool, kv_cache_dtype: str = "auto") -> tuple[list[list[int]], LLMEngine]:
    eng = LLMEngine(
        EngineConfig(
            model=str(model), device=device, dtype="float32", max_model_len=512, mixed_cuda_graphs=mixed,
            cache=CacheConfig(num_blocks=256, block_size=16, kv_cache_dtype=kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=96),
        )
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, output_kind="final")
    prompts = _prompts()
    outs: dict[str, list[int]] = {}
    eng.add_request("r0", prompts[0], params)
    for _ in range(3):  # the rest arrive while r0 decodes: their chunks mix with its decodes
        eng.step()
    for i, p in enumerate(prompts[1:], 1):
        eng.add_request(f"r{i}", p, params)
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
    return [outs[f"r{i}"] for i in range(len(prompts))], eng


@pytest.mark.parametrize(
    ("family", "overrides", "kv_cache_dtype"),
    [
        ("llama", {}, "auto"),
        ("qwen3", {"tie_word_embeddings": True}, "auto"),
        ("mistral", {"sliding_window": 40}, "auto"),
        ("llama", {}, "int8"),
    ],
)
def test_greedy_equals_eager_mixed_steps(cuda_device: str, tmp_path: Path, family: str, overrides: dict, kv_cache_dtype: str) -> None:
    model = write_random_checkpoint(tmp_path / family, family, seed=0, **overrides)
    off, eng_off = _run(model, cuda_device, mixed=False, kv_cache_dtype=kv_cache_dtype)
    assert eng_off.runner.mixed_graphs is None
    on, eng = _run(model, cuda_device, mixed=True, kv_cache_dtype=kv_cache_dtype)
    assert on == off
    mixed = eng.runner.mixed_graphs
    assert mixed is not None and mixed.replays > 0, "no step replayed mixed-step graphs"


def test_replayed_hidden_equals_pieces_run_eagerly(cuda_device: str, tmp_path: Path) -> None:
    model = write_random_checkpoint(tmp_path / "llama", "llama", seed=0)
    eng = LLMEngine(
        EngineConfig(
            model=str(model), device=cuda_device, dtype="float32", max_model_len=512, mixed_cuda_graphs=True,
            async_scheduling=False, cache=CacheConfig(num_blocks=256),
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=96),
        )
    )  # fmt: skip
    mixed = eng.runner.mixed_graphs
    assert mixed is not None
    replay = mixed.run
    compared: list[int] = []

    def both(input_ids, positions, meta, fill=None):  # type: ignore[no-untyped-def]
        hidden = replay(input_ids, positions, meta, fill).clone()
        eager = mixed.run_eager(torch.from_numpy(input_ids).to(cuda_device), torch.from_numpy(positions).to(cuda_device), meta)
        torch.testing.assert_close(hidden, eager, rtol=1e-4, atol=1e-4)
        compared.append(len(input_ids))
        return hidden

    mixed.run = both  # type: ignore[method-assign]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i, p in enumerate(_prompts()):
        eng.add_request(f"r{i}", p, params)
    while eng.has_unfinished_requests():
        eng.step()
    assert compared and any(n not in mixed.sizes for n in compared), compared


def test_longest_first_decode_order_changes_no_token(cuda_device: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode rows started longest context first (attention.backend.LONGEST_FIRST_MIN_ROWS),
    in captured decode graphs and in mixed steps, give the same greedy tokens."""
    from rtpllm.attention import backend

    model = write_random_checkpoint(tmp_path / "llama", "llama", seed=0)
    off, _ = _run(model, cuda_device, mixed=True)
    monkeypatch.setattr(backend, "LONGEST_FIRST_MIN_ROWS", 2)
    on, eng = _run(model, cuda_device, mixed=True)
    assert on == off
    assert eng.runner.graphs is not None and eng.runner.graphs._ordered(8)
