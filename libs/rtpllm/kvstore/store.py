"""TieredKVStore: host memory over SSD over Redis, as one store of encoded KV blocks.

Where blocks go:
- `put_many`: into the host tier now; to Redis (every block) by write-behind.
- host eviction: to SSD by write-behind if the block was hit at least `ssd_min_hits`
  times in the host tier or is pinned, else dropped (SSD is written only for blocks that
  were reused or explicitly pinned).
- SSD eviction: dropped.
- `get_many`: host first, then SSD, then Redis for what is still missing; SSD and Redis
  hits are promoted into the host tier.

Nothing here blocks on a slow tier for writes: write-behind queues are bounded by bytes
and drop (and count) what does not fit. Reads do wait for the tier they read from.

With `host_events` set, the store records the host tier's changes as KV events for
routers (blocks stored by puts and promotions, removed by evictions); the engine's
in-process tiers and the kvstore service both report them that way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rtpllm.kvcache.events import BlocksRemoved, BlocksStored, KVEvent
from rtpllm.kvstore.host_tier import Evicted, HostTier
from rtpllm.kvstore.ssd_tier import SSDTier
from rtpllm.kvstore.tier import TierStats
from rtpllm.kvstore.write_behind import WriteBehind

if TYPE_CHECKING:  # the redis client is an optional dependency (the `serve` extra)
    from rtpllm.kvstore.redis_tier import RedisTier

log = logging.getLogger(__name__)


class HostTierEvents:
    """The host tier's changes as KV events (`tier="host"`), in the order they happened,
    until `take()`. Thread-safe: evictions happen on any caller's thread.
    `block_tokens`: tokens per block, for `BlocksStored.num_tokens` (0 if unknown)."""

    def __init__(self, initial: Iterable[KVEvent] = (), block_tokens: int = 0) -> None:
        self._events: list[KVEvent] = list(initial)
        self._block_tokens = block_tokens
        self._lock = threading.Lock()

    def stored(self, keys: list[bytes]) -> None:
        if keys:
            event = BlocksStored(keys, None, len(keys) * self._block_tokens, tier="host")
            with self._lock:
                self._events.append(event)

    def removed(self, key: bytes) -> None:
        with self._lock:  # consecutive evictions become one event
            last = self._events[-1] if self._events else None
            if isinstance(last, BlocksRemoved):
                self._events[-1] = BlocksRemoved([*last.block_keys, key], tier="host")
            else:
                self._events.append(BlocksRemoved([key], tier="host"))

    def take(self) -> list[KVEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events


class TieredKVStore:
    """The tiers of one host, plus the shared Redis tier (either lower tier optional).

    Keys are block keys (rtpllm.kvcache.block_hash), values encoded blocks
    (rtpllm.kvstore.block_codec). Thread-safe. Takes over `host.on_evict`.
    `max_pending_bytes` bounds each write-behind queue (Redis writes, SSD demotions).
    """

    def __init__(
        self,
        host: HostTier,
        ssd: SSDTier | None = None,
        redis: RedisTier | None = None,
        ssd_min_hits: int = 1,
        *,
        max_pending_bytes: int = 256 << 20,
        close_timeout_s: float = 5.0,
    ) -> None:
        self.host = host
        self.ssd = ssd
        self.redis = redis
        self.ssd_min_hits = ssd_min_hits
        self.close_timeout_s = close_timeout_s
        self.demoted = 0  # host evictions queued for SSD
        self.dropped_on_eviction = 0  # host evictions that went nowhere
        self._to_redis = WriteBehind(redis, max_pending_bytes) if redis is not None else None
        self._to_ssd = WriteBehind(ssd, max_pending_bytes) if ssd is not None else None
        self._closed = False
        self._count_lock = threading.Lock()  # evictions happen on any caller's thread
        host.on_evict = self._on_host_evict
        self.host_events: HostTierEvents | None = None  # set by whoever reports them

    # -- reads ------------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> list[str]:
        """Tier name ("host", "ssd", "redis") of each key of the longest prefix of
        `keys` present in some tier (stops at the first key found nowhere).

        Cost: dict lookups for host and SSD; Redis is asked only when the chain reaches
        past a key missing locally, then once for all remaining keys (one round trip, a
        pipelined EXISTS per key). Advisory: a block may be evicted before it is fetched,
        so `get_many` can still miss.
        """
        keys = list(keys)
        in_host = self.host.contains_many(keys)
        in_ssd = self.ssd.contains_many(keys) if self.ssd is not None else [False] * len(keys)
        local = [h or s for h, s in zip(in_host, in_ssd, strict=True)]
        first_gap = local.index(False) if False in local else len(keys)
        in_redis = [False] * len(keys)
        if self.redis is not None and first_gap < len(keys):
            in_redis[first_gap:] = self.redis.contains_many(keys[first_gap:])
        out: list[str] = []
        for h, s, r in zip(in_host, in_ssd, in_redis, strict=True):
            if h:
                out.append("host")
            elif s:
                out.append("ssd")
            elif r:
                out.append("redis")
            else:
                break
        return out

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The encoded block of each key, or None; SSD and Redis hits are promoted
        into the host tier. Returned blocks were checked (CRC included) when read from
        SSD or Redis, or never left this process: decode them with
        `verify_checksum=False`."""
        out = self.host.get_many(keys)
        promoted: list[bytes] = []
        for tier in (self.ssd, self.redis):
            missing = [i for i, data in enumerate(out) if data is None]
            if tier is None or not missing:
                continue
            found = tier.get_many([keys[i] for i in missing])
            for i, data in zip(missing, found, strict=True):
                if data is not None:
                    out[i] = data
                    # Fetched because it was needed: that is a hit, which qualifies it
                    # for SSD when it leaves the host tier again.
                    self.host.put(keys[i], data, hits=1)
                    promoted.append(keys[i])
        self._report_stored(promoted)
        return out

    # -- writes -----------------------------------------------------------------------

    def put_many(self, keys: Sequence[bytes], payloads: Sequence[bytes], *, pin: bool = False) -> None:
        """Store blocks: host tier now, Redis by write-behind. Never blocks on a tier.
        `pin=True`: demote them to SSD when evicted from host even if never hit."""
        if len(keys) != len(payloads):
            raise ValueError(f"{len(keys)} keys for {len(payloads)} payloads")
        for key, data in zip(keys, payloads, strict=True):
            self.host.put(key, data, pinned=pin)
        self._report_stored(list(keys))
        if self._to_redis is not None:
            self._to_redis.submit(list(zip(keys, payloads, strict=True)))

    def pin(self, keys: Sequence[bytes]) -> int:
        """Pin blocks held in the host tier (see `put_many`); returns how many were there."""
        return sum(self.host.pin(k) for k in keys)

    def _report_stored(self, keys: list[bytes]) -> None:
        if self.host_events is not None and keys:
            # Only the keys still there: a put can evict blocks of the same batch.
            present = [k for k, there in zip(keys, self.host.contains_many(keys), strict=True) if there]
            self.host_events.stored(present)

    def _on_host_evict(self, ev: Evicted) -> None:
        if self.host_events is not None:
            self.host_events.removed(ev.key)
        if (
            self._to_ssd is not None
            and self.ssd is not None
            and (ev.pinned or ev.hits >= self.ssd_min_hits)
            and not self.ssd.contains(ev.key)
        ):
            if self._to_ssd.submit([(ev.key, ev.data)]):
                with self._count_lock:
                    self.demoted += 1
                return
        elif self.ssd is not None and self.ssd.contains(ev.key):
            return  # still on SSD (it came from there)
        with self._count_lock:
            self.dropped_on_eviction += 1

    # -- lifecycle and numbers --------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the write-behind queues to drain; False on timeout."""
        timeout = self.close_timeout_s if timeout is None else timeout
        return all(w.flush(timeout) for w in (self._to_redis, self._to_ssd) if w is not None)

    def close(self, timeout: float | None = None) -> bool:
        """Flush the write-behind queues (bounded by `timeout`, default
        `close_timeout_s`) and release the tiers. True if nothing was left unwritten."""
        if self._closed:
            return True
        self._closed = True
        timeout = self.close_timeout_s if timeout is None else timeout
        ok = all([w.close(timeout) for w in (self._to_redis, self._to_ssd) if w is not None])
        for tier in (self.host, self.ssd, self.redis):
            if tier is not None:
                tier.close()
        return ok

    def __enter__(self) -> TieredKVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """Per tier: hits, misses, bytes_read, bytes_written, evictions, corrupt,
        dropped_writes, errors, hit_ratio (+ size); the write-behind queues; demotions."""
        tiers: dict[str, Any] = {}
        for tier in (self.host, self.ssd, self.redis):
            if tier is None:
                continue
            stats: TierStats = tier.stats
            entry: dict[str, Any] = stats.as_dict()
            if isinstance(tier, HostTier | SSDTier):
                entry.update(blocks=len(tier), used_bytes=tier.used_bytes, capacity_bytes=tier.capacity_bytes)
            else:
                entry.update(available=tier.available)
            tiers[tier.name] = entry
        return {
            **tiers,
            "write_behind": {
                name: w.stats()
                for name, w in (("redis", self._to_redis), ("ssd", self._to_ssd))
                if w is not None
            },
            "demotion": {"to_ssd": self.demoted, "dropped": self.dropped_on_eviction},
        }
