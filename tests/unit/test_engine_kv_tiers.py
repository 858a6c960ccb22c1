"""The engine with KV tiers below its pool: evicted prefix blocks are demoted to host
memory (and SSD) and restored instead of recomputed; outputs stay exactly those of an
engine without tiers; a corrupt SSD block is recomputed; a tier slower than recompute
is not used."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtpllm import LLM, SamplingParams
from rtpllm.config import OffloadConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.kvcache.block_hash import block_keys
from rtpllm.kvcache.events import BlocksRemoved, KVEventBatch
from rtpllm.routing.prefix_index import PrefixIndex

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SYSTEM = [(13 * i + 5) % 300 for i in range(64)]  # 8 blocks of 8
OTHERS = [[(7 * i + j) % 300 for i in range(64)] for j in range(1, 4)]


def make(ckpt: Path, **offload) -> LLM:
    # 24 blocks of 8 tokens: room for about two 72-token requests, so later ones evict.
    return LLM(str(ckpt), device="cpu", block_size=8, num_blocks=24, max_num_batched_tokens=128, offload=OffloadConfig(**offload) if offload else None)


def run(llm: LLM, prompt: list[int]) -> tuple[list[int], int]:
    out = llm.generate([prompt], PARAMS)[0]
    return out.outputs[0].token_ids, out.num_cached_tokens


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> dict[int, list[int]]:
    llm = make(tiny_llama)
    return {i: run(llm, p)[0] for i, p in enumerate([SYSTEM + [1, 2, 3], *OTHERS])}


def test_evicted_prefix_comes_back_from_host_memory(tiny_llama: Path, reference: dict[int, list[int]]) -> None:
    llm = make(tiny_llama, host_bytes=64 << 20)
    assert run(llm, SYSTEM + [1, 2, 3]) == (reference[0], 0)
    for i, other in enumerate(OTHERS, start=1):  # push the system prompt out of the pool
        assert run(llm, other)[0] == reference[i]
    engine = llm.engine
    assert engine.offload is not None and engine.offload.stats.demoted_blocks >= 8
    tokens, cached = run(llm, SYSTEM + [1, 2, 3])
    assert tokens == reference[0]
    assert cached == 64, "every full block of the system prompt was restored, none recomputed"
    assert engine.offload.stats.restored_blocks["host"] >= 1
    stats = engine.stats()
    assert stats.tier_hit_tokens["host"] >= 8
    engine.block_manager.check_invariants(set())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_corrupt_ssd_block_is_recomputed(tiny_llama: Path, tmp_path: Path, reference: dict[int, list[int]]) -> None:
    # A host tier of three encoded blocks (4 KiB of KV + header each): the rest go to SSD.
    llm = make(tiny_llama, host_bytes=3 * 4200, ssd_dir=str(tmp_path), ssd_bytes=64 << 20)
    engine = llm.engine
    assert engine.offload is not None
    engine.offload.store.ssd_min_hits = 0  # demote everything evicted from host to SSD
    run(llm, SYSTEM + [1, 2, 3])
    for other in OTHERS:
        run(llm, other)
    engine.offload.store.flush(5)
    files = sorted(tmp_path.rglob("*.kvb"))
    assert files, "evicted blocks reached the SSD tier"
    for path in files:  # flip a byte in the middle of every block file
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    tokens, cached = run(llm, SYSTEM + [1, 2, 3])
    assert tokens == reference[0], "corrupt blocks are misses: recomputed, same output"
    assert engine.offload.store.ssd.stats.corrupt >= 1


def test_a_tier_slower_than_recompute_is_not_used(tiny_llama: Path, reference: dict[int, list[int]]) -> None:
    # 1 byte/s of host bandwidth vs 1000 tokens/s of prefill: recomputing always wins.
    llm = make(tiny_llama, host_bytes=64 << 20, host_gb_per_s=1e-9, prefill_tokens_per_s=1000)
    run(llm, SYSTEM + [1, 2, 3])
    for other in OTHERS:
        run(llm, other)
    tokens, cached = run(llm, SYSTEM + [1, 2, 3])
    assert tokens == reference[0]
    engine = llm.engine
    assert engine.offload is not None
    assert sum(engine.offload.stats.restored_blocks.values()) == 0
    assert engine.offload.stats.skipped_by_cost > 0


def test_the_cost_model_can_be_bypassed(tiny_llama: Path, reference: dict[int, list[int]]) -> None:
    """`use_cost_model = False` restores from a tier the cost model rejects (how
    bench/kv_tiers.py times a restore against recomputing)."""
    llm = make(tiny_llama, host_bytes=64 << 20, host_gb_per_s=1e-9, prefill_tokens_per_s=1000)
    offload = llm.engine.offload
    assert offload is not None
    assert offload.worth_restoring(["host"] * 8) == 0
    assert offload.prefill_rate == 1000 and offload.gb_per_s("host") == 1e-9
    run(llm, SYSTEM + [1, 2, 3])
    for other in OTHERS:
        run(llm, other)
    offload.use_cost_model = False
    assert run(llm, SYSTEM + [1, 2, 3]) == (reference[0], 64)
    assert offload.stats.restored_blocks["host"] == 8 and offload.stats.skipped_by_cost == 0


def test_prefill_speed_is_learned_from_prefill_steps(tiny_llama: Path) -> None:
    llm = make(tiny_llama, host_bytes=64 << 20)
    offload = llm.engine.offload
    assert offload is not None and offload.prefill_rate is None
    assert offload.worth_restoring(["redis"] * 3) == 3, "unknown prefill speed: restore everything"
    run(llm, OTHERS[0][:40])  # under 64 prompt tokens: too short to time
    assert offload.prefill_rate is None
    run(llm, OTHERS[1])
    assert offload.prefill_rate is not None and offload.prefill_rate > 0


def test_blocks_evicted_by_a_restore_are_stored_before_it_overwrites_them(tiny_llama: Path) -> None:
    """A restore takes free blocks that may still cache other prefixes: those must reach
    the tiers with their own KV, not the restored one (they come back right later)."""
    prompts = [[(13 * i + 5 + 31 * j) % 300 for i in range(64)] + [1, 2, 3] for j in range(6)]
    ref = make(tiny_llama)
    expected = [run(ref, p)[0] for p in prompts]
    llm = make(tiny_llama, host_bytes=64 << 20)
    restored = 0
    for j in [0, 1, 2, 0, 3, 1, 4, 2, 5, 0, 3, 1, 2, 4, 5, 0]:
        tokens, cached = run(llm, prompts[j])
        assert tokens == expected[j], f"prompt {j}: restored KV differs from recomputed"
        restored += cached
    assert restored >= 64 * 8


def test_kv_events_report_the_host_tier_as_the_snapshot_does(tiny_llama: Path) -> None:
    """Routers see the host tier: demotions add `tier="host"` blocks, host evictions
    remove them, and a router fed every batch ends with exactly the engine's snapshot
    (pool and host tier)."""
    batches: list[KVEventBatch] = []
    # Room for about 20 encoded blocks in host memory: later prompts evict from it too.
    llm = make(tiny_llama, host_bytes=20 * 4200)
    llm.engine = LLMEngine(llm.engine.config, on_kv_events=batches.append)  # one that reports KV events
    namespace = llm.engine.block_manager.namespace
    system_keys = block_keys(SYSTEM + [1, 2, 3], 8, namespace)[:8]
    run(llm, SYSTEM + [1, 2, 3])
    for other in OTHERS:  # push the system prompt out of the pool, into host memory
        run(llm, other)
    index = PrefixIndex()
    for b in batches:
        assert index.apply("e", b), "consecutive batches"
    applied = len(batches)
    match = index.match("e", system_keys)
    assert match.gpu + match.host == 8 and match.host >= 1, "evicted system blocks are reported in the host tier"
    for j in range(4, 9):  # more prompts: the 20-block host tier evicts
        run(llm, [(11 * i + j) % 300 for i in range(64)])
    for b in batches[applied:]:
        assert index.apply("e", b)
    assert any(isinstance(e, BlocksRemoved) and e.tier == "host" for b in batches for e in b.events)
    cached = llm.engine.cached_block_keys()
    truth = PrefixIndex()
    truth.replace("e", cached.gpu, cached.seq, host_keys=cached.host)
    assert index.last_seq("e") == cached.seq
    assert index.num_keys("e") == truth.num_keys("e") == len(set(cached.gpu))
    assert index.num_host_keys("e") == truth.num_host_keys("e") == len(set(cached.host)) > 0
    for keys in (system_keys, block_keys(OTHERS[2], 8, namespace)):
        assert index.match("e", keys) == truth.match("e", keys)
