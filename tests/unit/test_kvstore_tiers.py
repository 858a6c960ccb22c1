"""The host and SSD tiers on their own: LRU by bytes, atomic commits, restarts,
corruption handling, capacity."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from rtpllm.kvcache.block_hash import block_keys, namespace_key
from rtpllm.kvstore import Evicted, HostTier, SSDTier, Tier, encode_blocks
from rtpllm.transfer.layout import KVLayout

pytestmark = pytest.mark.timeout(30)

NS = namespace_key("tiny-llama", "bfloat16", 4)


def blocks(n: int, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    """`n` real encoded blocks and their chained keys."""
    kv = torch.empty(2, 2, n + 1, 4, 2, 8, dtype=torch.bfloat16)
    kv.view(torch.int16).random_(generator=torch.Generator().manual_seed(seed))
    keys = block_keys(list(range(seed * 1000, seed * 1000 + 4 * n)), 4, NS)
    return keys, encode_blocks(kv, list(range(n)), KVLayout.of(kv, NS))


# -- host tier -------------------------------------------------------------------------


def test_host_tier_is_an_lru_by_bytes() -> None:
    evicted: list[Evicted] = []
    host = HostTier(100, on_evict=evicted.append)
    assert isinstance(host, Tier)
    host.put(b"a", b"x" * 40)
    host.put(b"b", b"y" * 40)
    assert host.get(b"a") == b"x" * 40  # a is now the most recent
    host.put(b"c", b"z" * 30)  # 110 > 100: evicts b, the least recent
    assert host.keys() == [b"a", b"c"] and host.used_bytes == 70
    assert evicted == [Evicted(b"b", b"y" * 40, hits=0, pinned=False)]
    host.put(b"d", b"w" * 100)  # needs everything
    assert host.keys() == [b"d"] and host.used_bytes == 100
    assert [(e.key, e.hits) for e in evicted[1:]] == [(b"a", 1), (b"c", 0)]
    assert host.get(b"a") is None
    s = host.stats.as_dict()
    assert (s["hits"], s["misses"], s["evictions"], s["bytes_written"]) == (1, 1, 3, 210)
    assert s["hit_ratio"] == 0.5


def test_host_tier_keeps_the_first_copy_and_pins() -> None:
    evicted: list[Evicted] = []
    host = HostTier(100, on_evict=evicted.append)
    host.put(b"a", b"1" * 50)
    host.put(b"a", b"2" * 50, pinned=True)  # immutable: same key, same block
    assert host.get(b"a") == b"1" * 50 and host.used_bytes == 50
    assert host.pin(b"a") and not host.pin(b"nope")
    host.put(b"big", b"x" * 101)  # larger than the tier: not stored, nothing evicted
    assert not host.contains(b"big") and host.stats.dropped_writes == 1
    host.put(b"b", b"x" * 60)
    assert evicted == [Evicted(b"a", b"1" * 50, hits=1, pinned=True)]
    host.delete(b"b")
    assert len(host) == 0 and host.used_bytes == 0


def test_host_tier_eviction_callback_errors_do_not_escape() -> None:
    def boom(ev: Evicted) -> None:
        raise RuntimeError("callback bug")

    host = HostTier(10, on_evict=boom)
    host.put(b"a", b"x" * 10)
    host.put(b"b", b"x" * 10)
    assert host.keys() == [b"b"]


# -- SSD tier --------------------------------------------------------------------------


def test_ssd_put_get_and_layout(tmp_path: Path) -> None:
    keys, data = blocks(3)
    ssd = SSDTier(tmp_path, capacity_bytes=1 << 20)
    assert isinstance(ssd, Tier)
    ssd.put_many(list(zip(keys, data, strict=True)))
    assert ssd.get_many(keys) == data
    path = ssd.path(keys[0])
    assert path == tmp_path / keys[0].hex()[:2] / f"{keys[0].hex()}.kvb" and path.read_bytes() == data[0]
    assert ssd.contains_many(keys + [b"\0" * 16]) == [True, True, True, False]
    assert ssd.get(b"\0" * 16) is None
    assert ssd.used_bytes == sum(map(len, data))
    s = ssd.stats.as_dict()
    assert (s["hits"], s["misses"], s["bytes_read"], s["bytes_written"]) == (
        3,
        1,
        ssd.used_bytes,
        ssd.used_bytes,
    )
    ssd.delete(keys[1])
    assert not path.with_name(f"{keys[1].hex()}.kvb").exists() and ssd.get(keys[1]) is None


def test_ssd_leftover_temp_files_are_never_read(tmp_path: Path) -> None:
    keys, data = blocks(2)
    ssd = SSDTier(tmp_path, capacity_bytes=1 << 20)
    ssd.put(keys[0], data[0])
    # A writer that died between writing its temp file and the rename (the commit).
    shard = tmp_path / keys[1].hex()[:2]
    shard.mkdir(exist_ok=True)
    tmp = shard / f".{keys[1].hex()}.deadbeef.tmp"
    tmp.write_bytes(data[1][: len(data[1]) // 2])
    restarted = SSDTier(tmp_path, capacity_bytes=1 << 20, stale_temp_s=3600)
    assert restarted.keys() == [keys[0]] and restarted.get(keys[1]) is None
    assert tmp.exists()  # young: may belong to a live writer
    old = time.time() - 120
    os.utime(tmp, (old, old))
    SSDTier(tmp_path, capacity_bytes=1 << 20, stale_temp_s=60)
    assert not tmp.exists()  # stale: removed at start


def test_ssd_restart_rebuilds_the_index_in_lru_order(tmp_path: Path) -> None:
    keys, data = blocks(4)
    size = len(data[0])
    ssd = SSDTier(tmp_path, capacity_bytes=10 * size)
    ssd.put_many(list(zip(keys, data, strict=True)))
    # Access times decide the order after a restart (set explicitly: no clock games).
    for i, key in enumerate([keys[2], keys[0], keys[3], keys[1]]):
        t = 1_700_000_000 + i
        os.utime(ssd.path(key), (t, t))
    restarted = SSDTier(tmp_path, capacity_bytes=10 * size)
    assert restarted.keys() == [keys[2], keys[0], keys[3], keys[1]]
    assert restarted.used_bytes == 4 * size and restarted.get_many(keys) == data
    # A smaller capacity at start evicts the least recently used first.
    for i, key in enumerate([keys[2], keys[0], keys[3], keys[1]]):
        os.utime(ssd.path(key), (1_700_000_000 + i,) * 2)
    small = SSDTier(tmp_path, capacity_bytes=2 * size)
    assert small.keys() == [keys[3], keys[1]]
    assert not ssd.path(keys[2]).exists() and not ssd.path(keys[0]).exists()


def test_ssd_reads_refresh_recency_across_restarts(tmp_path: Path) -> None:
    keys, data = blocks(3)
    ssd = SSDTier(tmp_path, capacity_bytes=1 << 20)
    ssd.put_many(list(zip(keys, data, strict=True)))
    for key in keys:
        os.utime(ssd.path(key), (1_700_000_000,) * 2)
    ssd.get(keys[0])  # touches the file: most recent now
    assert SSDTier(tmp_path, capacity_bytes=1 << 20).keys()[-1] == keys[0]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_ssd_corrupt_file_is_a_miss_deleted_and_counted(tmp_path: Path, damage: str) -> None:
    keys, data = blocks(2)
    ssd = SSDTier(tmp_path, capacity_bytes=1 << 20)
    ssd.put_many(list(zip(keys, data, strict=True)))
    path = ssd.path(keys[0])
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x10
    elif damage == "truncate":
        raw = raw[:-7]
    elif damage == "garbage":
        raw = bytearray(b"\x00" * len(raw))
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    assert ssd.get(keys[0]) is None
    assert not path.exists() and not ssd.contains(keys[0])
    assert ssd.stats.corrupt == 1 and ssd.stats.misses == 1
    assert ssd.used_bytes == len(data[1])
    assert ssd.get(keys[1]) == data[1]


def test_ssd_capacity_evicts_least_recently_used(tmp_path: Path) -> None:
    keys, data = blocks(5)
    size = len(data[0])
    ssd = SSDTier(tmp_path, capacity_bytes=3 * size)
    for key, d in zip(keys[:3], data[:3], strict=True):
        ssd.put(key, d)
    ssd.get(keys[0])  # keys[1] is now the least recent
    ssd.put(keys[3], data[3])
    assert ssd.keys() == [keys[2], keys[0], keys[3]]
    assert not ssd.path(keys[1]).exists()
    ssd.put(keys[4], data[4])
    assert ssd.keys() == [keys[0], keys[3], keys[4]]
    assert ssd.used_bytes == 3 * size and ssd.stats.evictions == 2
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted(f"{k.hex()}.kvb" for k in ssd.keys())
    ssd.put(b"huge" * 4, b"x" * (3 * size + 1))  # larger than the tier
    assert ssd.stats.dropped_writes == 1 and len(ssd) == 3


def test_ssd_file_deleted_behind_its_back_is_a_miss(tmp_path: Path) -> None:
    keys, data = blocks(1)
    ssd = SSDTier(tmp_path, capacity_bytes=1 << 20)
    ssd.put(keys[0], data[0])
    ssd.path(keys[0]).unlink()
    assert ssd.get(keys[0]) is None and not ssd.contains(keys[0]) and ssd.used_bytes == 0
