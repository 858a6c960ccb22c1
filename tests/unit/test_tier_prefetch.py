"""KV-tier lookups and restores off the step loop (ARCHITECTURE rule 8), against tiers
that hang, answer late or fail half-way: other requests' steps never wait for them, a
late answer is a miss, a failed or abandoned restore is recomputed with the same tokens,
and no restored block is read before its fetch has returned."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from rtpllm import LLM, SamplingParams
from rtpllm.config import OffloadConfig
from rtpllm.engine.kv_offload import KVOffload, OffloadStats
from rtpllm.engine.tier_prefetch import TierPrefetch
from rtpllm.kvcache.block_hash import block_keys
from rtpllm.kvcache.block_manager import BlockManager
from rtpllm.kvstore.engine_store import EngineKVStore

# Waits no thread hand-off on a loaded test machine can exceed: hits stay hits.
WIDE = {"tier_wait_min_s": 5.0, "tier_wait_max_s": 5.0}
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SYSTEM = [(13 * i + 5) % 300 for i in range(64)]  # 8 blocks of 8
OTHERS = [[(7 * i + j) % 300 for i in range(64)] for j in range(1, 9)]


class FakeNetworkTiers(EngineKVStore):
    """In-process tiers behind a fake network: lookups and fetches can hang (until a
    gate opens), answer late, or a fetch can restore only its first `fetch_good` blocks.
    A fetch first scribbles over its blocks, so a read before it returns gives wrong
    tokens."""

    on_network = True

    def __init__(self, inner: EngineKVStore, kv: torch.Tensor) -> None:
        self.inner = inner
        self.kv = kv
        self.lookup_gate = threading.Event()
        self.fetch_gate = threading.Event()
        self.lookup_gate.set()
        self.fetch_gate.set()
        self.lookup_delay_s = 0.0
        self.fetch_good: int | None = None
        self.fetch_raises = False
        self.lookups = 0
        self.fetches = 0

    def lookup(self, keys: Sequence[bytes]) -> list[str]:
        self.lookups += 1
        self.lookup_gate.wait()
        time.sleep(self.lookup_delay_s)
        return self.inner.lookup(keys)

    def fetch_into(self, keys: Sequence[bytes], block_ids: Sequence[int]) -> int:
        self.fetches += 1
        self.kv.index_fill_(2, torch.tensor(list(block_ids)), 100.0)  # garbage until it lands
        self.fetch_gate.wait()
        if self.fetch_raises:
            raise RuntimeError("connection reset")
        good = len(keys) if self.fetch_good is None else min(self.fetch_good, len(keys))
        return self.inner.fetch_into(keys[:good], block_ids[:good])

    def store_from(self, keys: Sequence[bytes], block_ids: Sequence[int], *, only_new: bool = False) -> None:
        self.inner.store_from(keys, block_ids, only_new=only_new)

    def close(self) -> None:
        self.lookup_gate.set()
        self.fetch_gate.set()
        self.inner.close()


_made: list[FakeNetworkTiers] = []


@pytest.fixture(autouse=True)
def _open_gates() -> Iterator[None]:
    """A failed test must not leave worker threads hung at interpreter exit."""
    yield
    for tiers in _made:
        tiers.lookup_gate.set()
        tiers.fetch_gate.set()
        tiers.lookup_delay_s = 0.0
    _made.clear()


def make(ckpt: Path, num_blocks: int = 64, **offload: float) -> tuple[LLM, FakeNetworkTiers]:
    config = OffloadConfig(host_bytes=64 << 20, background_tiers=True, **offload)  # type: ignore[arg-type]
    llm = LLM(
        str(ckpt),
        device="cpu",
        block_size=8,
        num_blocks=num_blocks,
        max_num_batched_tokens=128,
        offload=config,
    )
    offload = offload_of(llm)
    assert offload.prefetcher is not None
    tiers = FakeNetworkTiers(offload.tiers, llm.engine.kv_pool.kv)
    offload.tiers = offload.prefetcher.tiers = tiers
    _made.append(tiers)
    return llm, tiers


def offload_of(llm: LLM) -> KVOffload:
    assert llm.engine.offload is not None
    return llm.engine.offload


def run(llm: LLM, prompt: list[int]) -> tuple[list[int], int]:
    out = llm.generate([prompt], PARAMS)[0]
    return out.outputs[0].token_ids, out.num_cached_tokens


def evict_system_prompt(llm: LLM) -> None:
    """SYSTEM computed, then pushed out of the pool (demoted to host memory)."""
    run(llm, SYSTEM + [1, 2, 3])
    bm = llm.engine.block_manager
    for other in OTHERS[: bm.num_blocks // 8 + 1]:
        run(llm, other)
    # Blocks are freed tail first, so the first block is the last one evicted.
    assert not bm.cached_block_ids(block_keys(SYSTEM, 8, bm.namespace)[:1]), "SYSTEM left the pool"
    assert offload_of(llm).stats.demoted_blocks >= 8


def settle(llm: LLM, tiers: FakeNetworkTiers) -> None:
    """Open the gates, let abandoned restores return and give their blocks back."""
    tiers.lookup_gate.set()
    tiers.fetch_gate.set()
    offload = offload_of(llm)
    assert offload.prefetcher is not None
    deadline = time.monotonic() + 10
    while offload.prefetcher._orphans and time.monotonic() < deadline:
        offload.settle()
        time.sleep(0.01)
    assert not offload.prefetcher._orphans


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> dict[str, list[int]]:
    llm = LLM(str(tiny_llama), device="cpu", block_size=8, num_blocks=64, max_num_batched_tokens=128)
    prompts = {"system": SYSTEM + [1, 2, 3], "system2": SYSTEM + [4, 5, 6]}
    return {name: run(llm, p)[0] for name, p in prompts.items()}


def test_background_restore_equals_recompute(tiny_llama: Path, reference: dict[str, list[int]]) -> None:
    llm, tiers = make(tiny_llama, num_blocks=32, **WIDE)
    evict_system_prompt(llm)
    lookups = tiers.lookups
    assert run(llm, SYSTEM + [1, 2, 3]) == (reference["system"], 64), (
        "all 8 blocks restored in the background"
    )
    assert tiers.lookups == lookups + 1 and tiers.fetches == 1
    offload = offload_of(llm)
    assert offload.stats.restored_blocks["host"] == 8
    assert llm.engine.stats().tier_hit_tokens["host"] == 64
    bm = llm.engine.block_manager
    bm.check_invariants(set())
    assert bm.num_free_blocks == bm.num_blocks


def test_a_hung_lookup_delays_no_other_request(tiny_llama: Path, reference: dict[str, list[int]]) -> None:
    """Every lookup hangs. A running stream gets a token every step while a new request
    waits (at most its cap) for the tiers; then the new one is computed as a miss."""
    cap = 0.5  # whatever the prefill speed learned: both requests wait this long
    llm, tiers = make(tiny_llama, num_blocks=160, tier_wait_min_s=cap, tier_wait_max_s=cap)
    engine = llm.engine
    tiers.lookup_gate.clear()
    stream = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)
    engine.add_request("a", OTHERS[0], stream)
    t0 = time.monotonic()
    while not any(o.request_id == "a" and o.outputs[0].token_ids for o in engine.step()):
        assert time.monotonic() - t0 < cap + 5
    assert time.monotonic() - t0 >= cap * 0.9, "a waited for its own lookup, up to the cap"

    engine.add_request(
        "b",
        SYSTEM + [1, 2, 3],
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, output_kind="final"),
    )
    b_out = None
    t_b = time.monotonic()
    steps: list[tuple[float, bool]] = []  # (seconds, did a get a token)
    while b_out is None:
        t = time.perf_counter()
        outs = engine.step()
        a_token = any(o.request_id == "a" and o.outputs[0].token_ids for o in outs)
        steps.append((time.perf_counter() - t, a_token))
        b_out = next((o for o in outs if o.request_id == "b" and o.finished), None)
        assert len(steps) < 900, "a ran out of tokens before b finished"
    assert b_out.outputs[0].token_ids == reference["system"]
    assert b_out.num_cached_tokens == 0, "no answer from the tiers: a miss"
    assert time.monotonic() - t_b >= cap * 0.9, "b waited for its lookup, up to the cap"
    assert all(got for _, got in steps), "a decoded at every step while b waited"
    # A step waiting on the tier would never end; the bound is loose for a loaded machine.
    assert max(s for s, _ in steps) < cap, "no step waited for the hung tier"
    assert offload_of(llm).stats.late_lookups >= 2
    engine.abort_request("a")
    engine.step()
    settle(llm, tiers)


def test_a_late_answer_is_a_miss(tiny_llama: Path, reference: dict[str, list[int]]) -> None:
    llm, tiers = make(tiny_llama, num_blocks=32, tier_wait_min_s=0.05, tier_wait_max_s=0.05)
    evict_system_prompt(llm)
    tiers.lookup_delay_s = 2.0  # 40 times the cap
    t0 = time.monotonic()
    assert run(llm, SYSTEM + [1, 2, 3]) == (reference["system"], 0)
    assert time.monotonic() - t0 < 1.5, "the request did not wait for the late answer"
    offload = offload_of(llm)
    assert offload.stats.late_lookups == 1 and tiers.fetches == 0
    assert sum(offload.stats.restored_blocks.values()) == 0


def test_a_restore_failing_half_way_recomputes_the_rest(
    tiny_llama: Path, reference: dict[str, list[int]]
) -> None:
    llm, tiers = make(tiny_llama, num_blocks=32, **WIDE)
    evict_system_prompt(llm)
    tiers.fetch_good = 3  # 3 blocks land, the other 5 keep the scribbled garbage
    assert run(llm, SYSTEM + [1, 2, 3]) == (reference["system"], 24)
    stats = offload_of(llm).stats
    assert stats.restored_blocks["host"] == 3 and stats.failed_restores == 5
    llm.engine.block_manager.check_invariants(set())


def test_a_restore_that_raises_is_a_miss(tiny_llama: Path, reference: dict[str, list[int]]) -> None:
    llm, tiers = make(tiny_llama, num_blocks=32, **WIDE)
    evict_system_prompt(llm)
    tiers.fetch_raises = True
    assert run(llm, SYSTEM + [1, 2, 3]) == (reference["system"], 0)
    assert offload_of(llm).stats.failed_restores == 8
    bm = llm.engine.block_manager
    bm.check_invariants(set())
    assert bm.num_free_blocks == bm.num_blocks


def test_a_slow_restore_is_abandoned_and_nothing_reads_its_blocks(
    tiny_llama: Path, reference: dict[str, list[int]]
) -> None:
    """Two requests restore the same prefix; both fetches hang with garbage in their
    blocks. Both are computed after the cap, with the right tokens (nobody read the
    blocks); the blocks stay held until the fetches return, then come back, cached."""
    llm, tiers = make(tiny_llama, num_blocks=64, tier_wait_min_s=0.1, tier_wait_max_s=0.1)
    evict_system_prompt(llm)
    bm = llm.engine.block_manager
    tiers.fetch_gate.clear()
    outs = llm.generate([SYSTEM + [1, 2, 3], SYSTEM + [4, 5, 6]], PARAMS)
    assert [o.outputs[0].token_ids for o in outs] == [reference["system"], reference["system2"]]
    assert tiers.fetches == 2
    offload = offload_of(llm)
    assert offload.stats.late_restores == 2
    assert bm.num_free_blocks == bm.num_blocks - 16, "the hung fetches still hold their blocks"
    settle(llm, tiers)
    bm.check_invariants(set())
    assert bm.num_free_blocks == bm.num_blocks
    # Both requests computed the prefix meanwhile: the late copies stay private.
    assert offload.stats.late_restored_blocks == 0


def test_a_late_restore_still_fills_the_cache(tiny_llama: Path, reference: dict[str, list[int]]) -> None:
    """A request aborted while its restore hangs: when the fetch returns, its blocks are
    cached (valid KV), and the next request hits them."""
    llm, tiers = make(tiny_llama, num_blocks=32, tier_wait_min_s=5.0, tier_wait_max_s=5.0)
    evict_system_prompt(llm)
    engine = llm.engine
    tiers.fetch_gate.clear()
    engine.add_request("x", SYSTEM + [1, 2, 3], PARAMS)
    t0 = time.monotonic()
    while tiers.fetches == 0:
        engine.step()
        assert time.monotonic() - t0 < 5
    engine.abort_request("x")
    engine.step()
    settle(llm, tiers)
    offload = offload_of(llm)
    assert offload.stats.late_restored_blocks == 8
    fetches = tiers.fetches
    assert run(llm, SYSTEM + [1, 2, 3]) == (reference["system"], 64)
    assert tiers.fetches == fetches, "served from the pool: the late restore cached them"


def test_restores_hold_at_most_half_the_pool(tiny_llama: Path, reference: dict[str, list[int]]) -> None:
    """A fetch that never returns never gives its blocks back: restores may hold at most
    half the pool, so the engine keeps serving."""
    llm, tiers = make(tiny_llama, num_blocks=24, tier_wait_min_s=0.05, tier_wait_max_s=0.05)
    evict_system_prompt(llm)
    tiers.fetch_gate.clear()
    outs = llm.generate([SYSTEM + [1, 2, 3], SYSTEM + [4, 5, 6]], PARAMS)
    assert [o.outputs[0].token_ids for o in outs] == [reference["system"], reference["system2"]]
    stats = offload_of(llm).stats
    assert stats.late_restores == 2 and stats.dropped_restores == 4  # 8 + 4 of 16 blocks tried
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks - 12
    settle(llm, tiers)
    assert bm.num_free_blocks == bm.num_blocks


class CountingTiers(EngineKVStore):
    """Tiers that hold nothing and count the lookups."""

    on_network = True

    def __init__(self) -> None:
        self.lookups = 0

    def lookup(self, keys: Sequence[bytes]) -> list[str]:
        self.lookups += 1
        return []

    def fetch_into(self, keys: Sequence[bytes], block_ids: Sequence[int]) -> int:
        return 0

    def store_from(self, keys: Sequence[bytes], block_ids: Sequence[int], *, only_new: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_tiers_are_asked_once_per_admission() -> None:
    """A request refused for lack of blocks after its answer is not looked up (and kept
    waiting) again, which would let the requests behind it pass it every step; after a
    preemption it is asked again."""
    bm = BlockManager(16, 4, b"ns")
    tiers = CountingTiers()
    prefetch = TierPrefetch(
        tiers, bm, OffloadStats(), plan=len, wait_cap=lambda n: 5.0, before_write=lambda: None
    )
    keys = [bytes([i]) * 16 for i in range(4)]

    def answer(admission: int) -> int:
        deadline = time.monotonic() + 5
        while (got := prefetch.prefix("r", keys, (), admission)) is None:
            assert time.monotonic() < deadline
            prefetch.wait(0.01)
        return got

    prefetch.lookup("r", keys, 0)
    assert answer(0) == 0 and tiers.lookups == 1
    assert prefetch.prefix("r", keys, (), 0) == 0 and tiers.lookups == 1, "answered for this admission"
    assert answer(1) == 0 and tiers.lookups == 2, "preempted: asked again"
    prefetch.forget("r")
    prefetch.close()
