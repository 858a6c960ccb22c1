"""TieredKVStore semantics: longest prefix chain across tiers, promotion on hit, demotion
on eviction only for reused or pinned blocks, write-behind that never blocks.

The shared tier is an in-process stand-in here (a dict behind the Tier interface, able
to stall); tests/integration/test_kvstore_redis.py runs the same paths on a real Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from rtpllm.kvcache.block_hash import block_keys, namespace_key
from rtpllm.kvstore import HostTier, SSDTier, TieredKVStore, TierStats, decode_into, encode_blocks
from rtpllm.transfer.layout import KVLayout

pytestmark = pytest.mark.timeout(30)

NS = namespace_key("tiny-llama", "bfloat16", 4)


class SharedTier:
    """A dict as the shared tier; `stall` makes writes wait until released."""

    name = "redis"

    def __init__(self) -> None:
        self.stats = TierStats()
        self.data: dict[bytes, bytes] = {}
        self.probes = 0
        self.stall = threading.Event()
        self.stall.set()
        self.available = True

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out = [self.data.get(k) for k in keys]
        self.stats.add(hits=sum(v is not None for v in out), misses=sum(v is None for v in out))
        return out

    def put(self, key: bytes, data: bytes) -> None:
        self.put_many([(key, data)])

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        self.stall.wait()
        for k, v in items:
            self.data[k] = v

    def delete(self, key: bytes) -> None:
        self.data.pop(key, None)

    def contains(self, key: bytes) -> bool:
        return key in self.data

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        self.probes += 1
        return [k in self.data for k in keys]

    def keys(self) -> list[bytes]:
        return list(self.data)

    def close(self) -> None:
        pass


def blocks(n: int, seed: int = 0) -> tuple[torch.Tensor, list[bytes], list[bytes]]:
    """A pool, the chained keys of `n` blocks and those blocks encoded."""
    kv = torch.empty(2, 2, n + 1, 4, 2, 8, dtype=torch.bfloat16)
    kv.view(torch.int16).random_(generator=torch.Generator().manual_seed(seed))
    keys = block_keys(list(range(seed * 1000, seed * 1000 + 4 * n)), 4, NS)
    return kv, keys, encode_blocks(kv, list(range(n)), KVLayout.of(kv, NS))


def test_lookup_is_the_longest_prefix_chain_across_tiers(tmp_path: Path) -> None:
    _, keys, data = blocks(6)
    shared = SharedTier()
    host = HostTier(1 << 20)
    ssd = SSDTier(tmp_path, 1 << 20)
    with TieredKVStore(host, ssd, shared) as store:  # type: ignore[arg-type]
        host.put(keys[0], data[0])
        ssd.put(keys[1], data[1])
        shared.put(keys[2], data[2])
        host.put(keys[3], data[3])
        # keys[4] is nowhere: the chain stops there even though keys[5] is cached.
        host.put(keys[5], data[5])
        assert store.lookup(keys) == ["host", "ssd", "redis", "host"]
        assert shared.probes == 1  # one round trip for everything past the local chain
        assert store.lookup(keys[:2]) == ["host", "ssd"] and shared.probes == 1  # local chain: no probe
        assert store.lookup(keys[4:]) == [] and store.lookup([]) == []
        # A block in a faster tier wins.
        shared.put(keys[0], data[0])
        assert store.lookup(keys[:1]) == ["host"]


def test_get_many_promotes_hits_into_the_host_tier(tmp_path: Path) -> None:
    kv, keys, data = blocks(4)
    shared = SharedTier()
    host = HostTier(1 << 20)
    ssd = SSDTier(tmp_path, 1 << 20)
    with TieredKVStore(host, ssd, shared) as store:  # type: ignore[arg-type]
        host.put(keys[0], data[0])
        ssd.put(keys[1], data[1])
        shared.put(keys[2], data[2])
        assert store.get_many(keys) == [data[0], data[1], data[2], None]
        assert host.contains_many(keys) == [True, True, True, False]
        assert store.lookup(keys) == ["host"] * 3
        # Each tier was asked only for what the tiers above missed.
        s = store.stats()
        assert (s["host"]["hits"], s["host"]["misses"]) == (1, 3)
        assert (s["ssd"]["hits"], s["ssd"]["misses"]) == (1, 2)
        assert (s["redis"]["hits"], s["redis"]["misses"]) == (1, 1)
        assert s["ssd"]["hit_ratio"] == pytest.approx(1 / 3) and s["redis"]["hit_ratio"] == 0.5
        # What comes back decodes into a pool bit-exactly.
        dst = torch.zeros_like(kv)
        layout = KVLayout.of(kv, NS)
        decode_into(dst, [3, 2, 1], store.get_many(keys[:3]), layout, verify_checksum=False)
        assert torch.equal(dst[:, :, [3, 2, 1]].view(torch.int16), kv[:, :, :3].view(torch.int16))


def test_demotion_to_ssd_only_for_reused_or_pinned_blocks(tmp_path: Path) -> None:
    _, keys, data = blocks(8)
    size = len(data[0])
    host = HostTier(2 * size)
    ssd = SSDTier(tmp_path, 1 << 20)
    with TieredKVStore(host, ssd) as store:
        store.put_many(keys[:2], data[:2])
        assert store.get_many(keys[:1]) == data[:1]  # block 0 is reused
        store.put_many(keys[2:4], data[2:4])  # evicts blocks 1 (never hit) then 0 (hit)
        store.flush()
        assert ssd.keys() == [keys[0]]
        store.put_many(keys[4:5], data[4:5], pin=True)  # evicts block 2
        store.put_many(keys[5:6], data[5:6])
        assert store.pin(keys[5:6] + keys[7:8]) == 1  # block 7 is not there
        store.put_many(keys[6:8], data[6:8])  # evicts 3 (dropped), 4 (pinned), 5 (pinned)
        store.flush()
        assert sorted(ssd.keys()) == sorted([keys[0], keys[4], keys[5]])
        assert store.stats()["demotion"] == {"to_ssd": 3, "dropped": 3}
        # SSD hits come back into host; evicted again they are already on SSD: no rewrite.
        assert store.get_many(keys[:1]) == data[:1]
        writes = ssd.stats.bytes_written
        store.put_many(keys[1:3], data[1:3])
        store.flush()
        assert ssd.stats.bytes_written == writes and ssd.contains(keys[0])
        assert store.lookup(keys[:1]) == ["ssd"]


def test_ssd_min_hits(tmp_path: Path) -> None:
    _, keys, data = blocks(4)
    size = len(data[0])
    host = HostTier(size)
    ssd = SSDTier(tmp_path, 1 << 20)
    with TieredKVStore(host, ssd, ssd_min_hits=2) as store:
        store.put_many(keys[:1], data[:1])
        store.get_many(keys[:1])
        store.put_many(keys[1:2], data[1:2])  # block 0 had 1 hit: dropped
        store.get_many(keys[1:2])
        store.get_many(keys[1:2])
        store.put_many(keys[2:3], data[2:3])  # block 1 had 2 hits: demoted
        store.flush()
        assert ssd.keys() == [keys[1]]


def test_put_many_writes_every_block_to_the_shared_tier(tmp_path: Path) -> None:
    _, keys, data = blocks(5)
    shared = SharedTier()
    store = TieredKVStore(HostTier(1 << 20), None, shared)  # type: ignore[arg-type]
    store.put_many(keys, data)
    assert store.close()
    assert shared.data == dict(zip(keys, data, strict=True))
    assert store.stats()["write_behind"]["redis"]["done"] == 5


def test_write_behind_never_blocks_on_a_stalled_tier(tmp_path: Path) -> None:
    _, keys, data = blocks(40)
    size = len(data[0])
    shared = SharedTier()
    shared.stall.clear()  # the shared tier hangs on every write
    store = TieredKVStore(HostTier(1 << 20), None, shared, max_pending_bytes=4 * size)  # type: ignore[arg-type]
    start = time.monotonic()
    for i in range(0, 40, 4):
        store.put_many(keys[i : i + 4], data[i : i + 4])
    assert time.monotonic() - start < 1.0, "put_many waited for a stalled tier"
    wb = store.stats()["write_behind"]["redis"]
    # At most the first batch is stuck in the tier, at most 4 blocks more queued behind it.
    assert wb["dropped"] >= 40 - 8 and wb["dropped"] + wb["submitted"] == 40
    assert shared.stats.dropped_writes == wb["dropped"]
    assert store.get_many(keys) == data  # the host tier has everything regardless
    # close() waits a bounded time, then gives up on what is still queued.
    start = time.monotonic()
    assert not store.close(timeout=0.3)
    assert time.monotonic() - start < 1.5
    shared.stall.set()


def test_stalled_redis_does_not_hold_back_ssd_demotions(tmp_path: Path) -> None:
    _, keys, data = blocks(4)
    shared = SharedTier()
    shared.stall.clear()
    host = HostTier(len(data[0]))
    ssd = SSDTier(tmp_path, 1 << 20)
    store = TieredKVStore(host, ssd, shared, ssd_min_hits=0)  # type: ignore[arg-type]
    store.put_many(keys, data)
    deadline = time.monotonic() + 5
    while len(ssd) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(ssd.keys()) == sorted(keys[:3])
    shared.stall.set()
    assert store.close()


def test_corrupt_ssd_block_is_a_miss_through_the_store(tmp_path: Path) -> None:
    _, keys, data = blocks(2)
    ssd = SSDTier(tmp_path, 1 << 20)
    ssd.put_many(list(zip(keys, data, strict=True)))
    path = ssd.path(keys[1])
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40
    path.write_bytes(bytes(raw))
    with TieredKVStore(HostTier(1 << 20), ssd) as store:
        assert store.lookup(keys) == ["ssd", "ssd"]  # the index cannot know yet
        assert store.get_many(keys) == [data[0], None]
        assert store.lookup(keys) == ["host"]
        assert store.stats()["ssd"]["corrupt"] == 1


def test_stats_shape(tmp_path: Path) -> None:
    with TieredKVStore(HostTier(1 << 20), SSDTier(tmp_path, 1 << 20)) as store:
        s = store.stats()
    assert set(s) == {"host", "ssd", "write_behind", "demotion"}
    for tier in ("host", "ssd"):
        assert {
            "hits",
            "misses",
            "bytes_read",
            "bytes_written",
            "evictions",
            "corrupt",
            "dropped_writes",
            "hit_ratio",
            "blocks",
            "used_bytes",
            "capacity_bytes",
        } <= set(s[tier])
    with pytest.raises(ValueError, match="2 keys for 1 payloads"):
        store.put_many([b"a", b"b"], [b"x"])
