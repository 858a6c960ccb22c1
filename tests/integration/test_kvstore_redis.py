"""The Redis tier and the store against a real redis-server on a free loopback port:
blocks through Redis, TTLs, two hosts sharing one Redis, and Redis going away and
coming back (misses and dropped writes meanwhile, never an exception)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from rtpllm.kvcache.block_hash import block_keys, namespace_key
from rtpllm.kvstore import HostTier, SSDTier, TieredKVStore, decode_into, encode_blocks
from rtpllm.kvstore.redis_tier import RedisTier
from rtpllm.runtime.processes import ManagedProcess, free_port, redis_server_binary, start_redis
from rtpllm.transfer.layout import KVLayout

pytestmark = pytest.mark.timeout(60)

NS = namespace_key("tiny-llama", "bfloat16", 4)
BACKOFF = 0.3


@pytest.fixture
def redis_server() -> Iterator[tuple[ManagedProcess, str, int]]:
    try:
        redis_server_binary()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    port = free_port()
    proc, url = start_redis(port)
    yield proc, url, port
    proc.stop(5)


def blocks(n: int, seed: int = 0) -> tuple[torch.Tensor, list[bytes], list[bytes]]:
    kv = torch.empty(2, 2, n + 1, 4, 2, 8, dtype=torch.bfloat16)
    kv.view(torch.int16).random_(generator=torch.Generator().manual_seed(seed))
    keys = block_keys(list(range(seed * 1000, seed * 1000 + 4 * n)), 4, NS)
    return kv, keys, encode_blocks(kv, list(range(n)), KVLayout.of(kv, NS))


def test_blocks_through_redis_with_ttl(redis_server: tuple[ManagedProcess, str, int]) -> None:
    _, url, _ = redis_server
    kv, keys, data = blocks(5)
    tier = RedisTier(url, ttl_s=120, prefix=b"test:kv:", mget_batch=2)  # several MGETs
    tier.put_many(list(zip(keys[:4], data[:4], strict=True)))
    assert tier.get_many(keys) == data[:4] + [None]
    assert tier.contains_many(keys) == [True] * 4 + [False]
    assert sorted(tier.keys()) == sorted(keys[:4])
    for key in keys[:4]:
        ttl = tier.ttl(key)
        assert ttl is not None and 110 <= ttl <= 120
    raw = redis.Redis.from_url(url)
    assert raw.get(b"test:kv:" + keys[0]) == data[0]  # one plain string value per block
    assert 0 < raw.ttl(b"test:kv:" + keys[0]) <= 120
    s = tier.stats.as_dict()
    assert (s["hits"], s["misses"], s["errors"]) == (4, 1, 0)
    assert s["bytes_written"] == s["bytes_read"] == sum(map(len, data[:4]))
    dst = torch.zeros_like(kv)
    decode_into(dst, [0, 1, 2, 3], tier.get_many(keys[:4]), KVLayout.of(kv, NS))
    assert torch.equal(dst[:, :, :4].view(torch.int16), kv[:, :, :4].view(torch.int16))
    tier.close()


def test_corrupt_value_is_a_miss_and_deleted(redis_server: tuple[ManagedProcess, str, int]) -> None:
    _, url, _ = redis_server
    _, keys, data = blocks(2)
    tier = RedisTier(url, prefix=b"test:kv:")
    raw = redis.Redis.from_url(url)
    raw.set(b"test:kv:" + keys[0], data[0][:-1])  # truncated
    bad = bytearray(data[1])
    bad[-1] ^= 1
    raw.set(b"test:kv:" + keys[1], bytes(bad))
    assert tier.get_many(keys) == [None, None]
    assert raw.exists(b"test:kv:" + keys[0], b"test:kv:" + keys[1]) == 0
    assert tier.stats.corrupt == 2 and tier.stats.misses == 2
    tier.close()


def test_a_second_host_sees_blocks_put_by_the_first(
    redis_server: tuple[ManagedProcess, str, int], tmp_path: Path
) -> None:
    _, url, _ = redis_server
    _, keys, data = blocks(6)
    first = TieredKVStore(HostTier(1 << 20), SSDTier(tmp_path / "a", 1 << 20), RedisTier(url, ttl_s=60))
    first.put_many(keys[:4], data[:4])
    assert first.close()  # flushes the write-behind queue to Redis
    second = TieredKVStore(HostTier(1 << 20), SSDTier(tmp_path / "b", 1 << 20), RedisTier(url, ttl_s=60))
    with second:
        assert second.lookup(keys) == ["redis"] * 4
        assert second.get_many(keys) == data[:4] + [None, None]
        assert second.lookup(keys) == ["host"] * 4  # promoted
        s = second.stats()
        assert s["redis"]["hits"] == 4 and s["redis"]["misses"] == 2 and s["redis"]["available"]


def test_redis_down_is_misses_then_back_after_the_backoff(
    redis_server: tuple[ManagedProcess, str, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc, url, port = redis_server
    _, keys, data = blocks(6)
    redis_tier = RedisTier(url, ttl_s=60, down_backoff_s=BACKOFF, socket_timeout_s=1.0)
    store = TieredKVStore(HostTier(1 << 20), None, redis_tier)
    store.put_many(keys[:2], data[:2])
    assert store.flush()
    proc.stop(5)  # Redis goes away

    caplog.set_level(logging.WARNING, logger="rtpllm.kvstore.redis_tier")
    fresh = TieredKVStore(HostTier(1 << 20), None, RedisTier(url, ttl_s=60, down_backoff_s=BACKOFF))
    start = time.monotonic()
    for _ in range(3):
        # keys[:2] are only in the (gone) Redis.
        assert fresh.lookup(keys[:2]) == []
        assert fresh.get_many(keys[:2]) == [None, None]
        fresh.put_many(keys[2:4], data[2:4])  # accepted by the host tier, dropped for Redis
        time.sleep(BACKOFF * 1.2)  # past the back-off: the next call tries again and fails again
    assert fresh.flush()
    assert time.monotonic() - start < 10
    assert fresh.get_many(keys[2:4]) == data[2:4]  # the host tier is unaffected
    s = fresh.stats()["redis"]
    assert s["misses"] >= 2 and s["errors"] >= 2 and s["dropped_writes"] >= 2 and s["hits"] == 0
    outage_lines = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage_lines) == 1, "one log line per outage, not per call"

    # Redis comes back (empty: no persistence) on the same port.
    restarted, _ = start_redis(port)
    try:
        time.sleep(BACKOFF * 1.2)
        fresh.put_many(keys[4:6], data[4:6])
        assert fresh.flush()
        assert fresh.redis is not None and fresh.redis.get_many(keys[4:6]) == data[4:6]
        assert [r for r in caplog.records if "is back" in r.getMessage()]
        # The first store's connection pool recovers as well.
        time.sleep(BACKOFF * 1.2)
        assert store.get_many([keys[0]]) == [data[0]]  # from its host tier
        assert redis_tier.get_many(keys[4:6]) == data[4:6]
        assert fresh.close() and store.close()
    finally:
        restarted.stop(5)


def test_redis_down_from_the_start(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    _, keys, data = blocks(2)
    with TieredKVStore(
        HostTier(1 << 20), SSDTier(tmp_path, 1 << 20), RedisTier(url, down_backoff_s=BACKOFF)
    ) as store:
        store.put_many(keys, data)
        assert store.lookup(keys) == ["host", "host"]
        assert store.lookup([b"\0" * 16]) == []
        assert store.get_many(keys) == data
        assert store.flush()
        assert not store.redis.available  # type: ignore[union-attr]
