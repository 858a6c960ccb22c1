"""Redis tier: encoded blocks shared by every instance, each with a TTL.

Each block is one string value `<prefix><key>` written by one `SET ... EX ttl`: Redis
applies a command whole, so a reader never sees half a block (rule 6). Batches are one
round trip each (`MGET` for reads, pipelined `SET`s and `EXISTS`s). Values are checked
on read (block_codec.check_block); a bad one is a miss, deleted and counted.

Losing Redis costs speed, never correctness: a connection error or timeout marks the
tier down for `down_backoff_s`, during which every call is a miss or a dropped write
without touching the network; one log line when an outage starts, one when it ends.

Synchronous client on purpose: the store calls tiers from its caller's thread and from
its write-behind threads, never from an event loop. redis-py's client is thread-safe
(a connection pool); its own retries are turned off so that a dead server costs one
failed call, not a retry loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rtpllm.credentials import redact_url
from rtpllm.kvstore.block_codec import CorruptBlock, check_block
from rtpllm.kvstore.tier import TierStats

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures that mean "the server is not there (right now)": back off.
_OUTAGE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def _default_mget_batch() -> int:
    """Keys per MGET. Measured with 2 MiB blocks on loopback: the pure-Python reply
    parser reads ~0.45 GB/s whatever the batch (4-16 best); hiredis reads ~3 GB/s one
    value per reply but slows down (~1 GB/s) when one reply carries several large
    values, so with hiredis each key gets its own request."""
    from redis.utils import HIREDIS_AVAILABLE

    return 1 if HIREDIS_AVAILABLE else 8


class RedisTier:
    """Blocks in a Redis server at `url` under `prefix`, expiring `ttl_s` after their
    last write. Size Redis itself with `maxmemory` and an eviction policy such as
    `allkeys-lru`: the TTL bounds staleness, not memory."""

    name = "redis"

    def __init__(
        self,
        url: str,
        ttl_s: int = 3600,
        prefix: bytes = b"rtpllm:kv:",
        *,
        down_backoff_s: float = 2.0,
        socket_timeout_s: float = 2.0,
        connect_timeout_s: float = 0.5,
        mget_batch: int | None = None,
    ) -> None:
        self.url = redact_url(url)  # for log lines; the client gets the real one (with the password)
        self.ttl_s = int(ttl_s)
        self.prefix = bytes(prefix)
        self.down_backoff_s = down_backoff_s
        self.mget_batch = max(1, mget_batch or _default_mget_batch())
        self.stats = TierStats()
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._outage_since: float | None = None

    # -- availability -----------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while backing off after a failure."""
        return time.monotonic() >= self._down_until

    def _call(self, what: str, fn: Callable[[], T]) -> tuple[bool, T | None]:
        """(True, result), or (False, None) when down or failing (never raises)."""
        if not self.available:
            return False, None
        try:
            result = fn()
        except _OUTAGE as exc:
            self._mark_down(what, exc)
            return False, None
        except redis.exceptions.RedisError as exc:  # e.g. OOM refusing a write: not an outage
            log.warning("redis tier: %s failed: %s", what, exc)
            self.stats.add(errors=1)
            return False, None
        if self._outage_since is not None:
            with self._lock:
                since, self._outage_since = self._outage_since, None
            if since is not None:
                log.warning("redis tier %s is back after %.1f s", self.url, time.monotonic() - since)
        return True, result

    def _mark_down(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self._down_until = now + self.down_backoff_s
            first = self._outage_since is None
            if first:
                self._outage_since = now
        self.stats.add(errors=1)
        if first:
            log.warning(
                "redis tier %s unreachable (%s: %s): reads are misses and writes are dropped, retrying every %.1f s",
                self.url,
                what,
                exc,
                self.down_backoff_s,
            )

    def _k(self, key: bytes) -> bytes:
        return self.prefix + key

    # -- reads ------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        for start in range(0, len(keys), self.mget_batch):
            batch = keys[start : start + self.mget_batch]
            ok, values = self._call("MGET", lambda b=batch: self.client.mget([self._k(k) for k in b]))
            if not ok:
                self.stats.add(misses=len(keys) - start)
                break
            assert values is not None
            for i, value in enumerate(values):
                out[start + i] = self._checked(batch[i], value)
        return out

    def _checked(self, key: bytes, value: Any) -> bytes | None:
        if value is None:
            self.stats.add(misses=1)
            return None
        try:
            check_block(value)
        except CorruptBlock as exc:
            log.warning("redis tier: corrupt block %s deleted: %s", key.hex(), exc)
            self.delete(key)
            self.stats.add(misses=1, corrupt=1)
            return None
        self.stats.add(hits=1, bytes_read=len(value))
        return value

    def contains(self, key: bytes) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        """One round trip: a pipeline of EXISTS, one per key (O(1) each on the server)."""
        if not keys:
            return []

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._k(k))
            return pipe.execute()

        ok, found = self._call("EXISTS", run)
        return [bool(n) for n in found] if ok and found is not None else [False] * len(keys)

    def keys(self) -> list[bytes]:
        """Every block key under the prefix (SCAN: for tests and tools, not hot paths)."""
        ok, found = self._call(
            "SCAN", lambda: list(self.client.scan_iter(match=self.prefix + b"*", count=1000))
        )
        return [k[len(self.prefix) :] for k in found] if ok and found is not None else []

    def ttl(self, key: bytes) -> int | None:
        """Seconds left before `key` expires (None if absent or Redis is down)."""
        ok, left = self._call("TTL", lambda: self.client.ttl(self._k(key)))
        return left if ok and left is not None and left >= 0 else None

    # -- writes -----------------------------------------------------------------------

    def put(self, key: bytes, data: bytes) -> None:
        self.put_many([(key, data)])

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        if not items:
            return

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for key, data in items:
                pipe.set(self._k(key), data, ex=self.ttl_s)
            return pipe.execute()

        ok, _ = self._call("SET", run)
        if ok:
            self.stats.add(bytes_written=sum(len(d) for _, d in items))
        else:
            self.stats.add(dropped_writes=len(items))

    def delete(self, key: bytes) -> None:
        self._call("DEL", lambda: self.client.delete(self._k(key)))

    def close(self) -> None:
        self.client.close()
