"""Checkpoint formats, dtypes and KV events at the engine level."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rtpllm import LLM, SamplingParams
from rtpllm.config import CacheConfig, EngineConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.kvcache.events import BlocksRemoved, BlocksStored, KVEventBatch
from rtpllm.loader.random_checkpoint import write_random_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_sharded_bf16_checkpoint_loads_like_the_single_file(tmp_path: Path) -> None:
    one = write_random_checkpoint(tmp_path / "one", "qwen2", seed=3)
    sharded = write_random_checkpoint(tmp_path / "sharded", "qwen2", seed=3, num_shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    prompts = [[1, 2, 3], list(range(20, 45))]
    a = LLM(str(one), device="cpu").generate(prompts, GREEDY)
    b = LLM(str(sharded), device="cpu").generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_bf16_on_cpu_runs_and_mostly_agrees_with_fp32(tmp_path: Path) -> None:
    model_dir = write_random_checkpoint(tmp_path, "llama", dtype=torch.bfloat16)
    fp32 = LLM(str(model_dir), device="cpu", dtype="float32")
    bf16 = LLM(str(model_dir), device="cpu", dtype="bfloat16")
    assert bf16.engine.model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.engine.kv_pool.kv.dtype == torch.bfloat16
    a = fp32.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids
    b = bf16.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids
    assert a[0] == b[0]  # the first greedy token survives bf16 rounding on these weights


def test_kv_events_carry_increasing_sequence_numbers(tiny_llama: Path) -> None:
    batches: list[KVEventBatch] = []
    config = EngineConfig(model=str(tiny_llama), device="cpu", cache=CacheConfig(num_blocks=6, block_size=16))
    eng = LLMEngine(config, on_kv_events=batches.append, engine_id="e1")
    for i, prompt in enumerate([list(range(40)), list(range(100, 140)), list(range(200, 240))]):
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        while eng.has_unfinished_requests():
            eng.step()
    assert [b.seq for b in batches] == list(range(len(batches)))
    assert all(b.engine_id == "e1" for b in batches)
    stored = [k for b in batches for e in b.events if isinstance(e, BlocksStored) for k in e.block_keys]
    removed = [k for b in batches for e in b.events if isinstance(e, BlocksRemoved) for k in e.block_keys]
    assert len(stored) == 6  # two full blocks per prompt
    assert removed and set(removed) <= set(stored)  # the 6-block pool evicted older ones


def test_warm_up_leaves_no_trace(tiny_llama: Path) -> None:
    batches: list[KVEventBatch] = []
    eng = LLMEngine(EngineConfig(model=str(tiny_llama), device="cpu", async_scheduling=True), on_kv_events=batches.append)
    added: list[str] = []
    hits: list[int] = []
    add, reset = eng.add_request, eng.block_manager.reset_prefix_cache

    def spy_add(request_id: str, *args: Any, **kwargs: Any) -> Any:
        added.append(request_id)
        return add(request_id, *args, **kwargs)

    def spy_reset() -> None:
        hits.append(eng.block_manager.stats.hit_tokens)
        reset()

    eng.add_request, eng.block_manager.reset_prefix_cache = spy_add, spy_reset  # type: ignore[method-assign]
    eng._warm_up()  # runs automatically on CUDA; the logic is device-independent
    eng.add_request, eng.block_manager.reset_prefix_cache = add, reset  # type: ignore[method-assign]
    # The last warm-up request is a chunk over the long prompt's cached blocks.
    assert added[-1] == "__warmup3" and hits and hits[0] >= 16
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert not eng.block_manager._cached
    assert eng.stats().generation_tokens == 0 and eng.block_manager.stats.queried_tokens == 0
    assert batches == []
    out = LLM.__new__(LLM)  # the engine still serves normally afterwards
    out.engine, out._ids, out._partial = eng, iter(range(10**9)), {}
    assert len(out.generate([list(range(40))], GREEDY)[0].outputs[0].token_ids) == 12
    assert batches and batches[0].seq == 0
