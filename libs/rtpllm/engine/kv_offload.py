"""The engine's side of the KV tiers (ARCHITECTURE rules 1, 3, 6; docs/kvstore.md).

- Demotion: a prefix-cache block evicted from the KV pool is stored in the tiers (host
  memory, then SSD if reused) before its new owner overwrites it.
- Write-through (where others read the tiers: a Redis tier, or the host's kvstore):
  every newly committed full block is offered at once, so other instances and later
  lives of this one find it.
- Restore: when a request's prefix continues past what the pool holds, the blocks found
  in a lower tier are restored into free blocks and cached, if restoring is faster than
  recomputing (bytes / tier bandwidth vs tokens / prefill speed); the scheduler then
  sees them as ordinary prefix hits.

The tiers are the engine's own (`LocalKVStore`: a TieredKVStore in process) or its
host's kvstore service (`RemoteKVStore`, chosen with `OffloadConfig.kvstore_host_id` when
the kvstore answers at startup), behind one interface, `EngineKVStore`.

The pool is the engine's pool tensor (TP=1: copied directly, as it always was) or its
`KVBlocks` view (`LLMEngine.kv_blocks()`): with tensor parallelism whole blocks, every
rank's KV heads read and written through rank 0, so every tier holds whole blocks
whatever the split (the block-key namespace names the TP size, so TP=1 and TP=N blocks
never meet anyway); with a mixed per-layer KV plan its layer pages, a block being every
layer's pages (kvstore/block_codec.py).

Runs on the engine thread, and never waits on the network there (ARCHITECTURE rule 8):
- stores are in-process encoding (Redis writes go behind, `WriteBehind`) or a copy into
  the kvstore client's outbox (the put goes behind);
- with a tier on the network (Redis, the kvstore service; `OffloadConfig.background_tiers`),
  lookups start when a request is added and run, like restores, on worker threads; the
  request waits in the scheduler meanwhile, for a bounded time (`TierPrefetch`);
- with host memory and SSD only, lookups and restores run on the engine thread when the
  request is admitted (on CUDA a restore waits for the work already queued).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rtpllm.config import OffloadConfig
from rtpllm.engine.tier_prefetch import TierPrefetch
from rtpllm.kvcache.block_manager import BlockManager
from rtpllm.kvcache.events import KVEvent
from rtpllm.kvstore import HostTier, SSDTier, TieredKVStore
from rtpllm.kvstore.block_codec import block_payload_bytes
from rtpllm.kvstore.engine_store import EngineKVStore, LocalKVStore
from rtpllm.kvstore.store import HostTierEvents
from rtpllm.transfer.blocks import KVBlocks
from rtpllm.transfer.layout import KVLayout

log = logging.getLogger(__name__)

TIERS = ("host", "ssd", "redis")


@dataclass
class OffloadStats:
    restored_blocks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    skipped_by_cost: int = 0  # blocks found in a tier but cheaper to recompute
    failed_restores: int = 0  # blocks that vanished or failed their checksum
    demoted_blocks: int = 0
    offered_blocks: int = 0
    # Background tiers (TierPrefetch): answers and restores that came too late to use,
    # blocks such late restores still cached, and work not started (too much in flight).
    late_lookups: int = 0
    late_restores: int = 0
    late_restored_blocks: int = 0
    dropped_lookups: int = 0
    dropped_restores: int = 0


class KVOffload:
    """Moves blocks between one engine's KV pool and the KV tiers (`tiers`: in process,
    or the host's kvstore service)."""

    def __init__(
        self,
        config: OffloadConfig,
        kv: torch.Tensor | KVBlocks,
        block_manager: BlockManager,
        tiers: EngineKVStore | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.bm = block_manager
        self.layout = kv.layout if isinstance(kv, KVBlocks) else KVLayout.of(kv, block_manager.namespace)
        if self.layout.namespace != block_manager.namespace:
            raise ValueError("the KV pool's view names another block-key namespace than the block manager")
        self.block_bytes = block_payload_bytes(self.layout)  # a whole block, every KV head
        self.store: TieredKVStore | None = None  # the in-process tiers, when they are used
        if tiers is None:
            ssd = SSDTier(config.ssd_dir, config.ssd_bytes) if config.ssd_dir and config.ssd_bytes > 0 else None
            redis = None
            if config.redis_url:
                from rtpllm.kvstore.redis_tier import RedisTier

                redis = RedisTier(config.redis_url, ttl_s=config.redis_ttl_s)
            self.store = TieredKVStore(HostTier(config.host_bytes), ssd, redis)
            tiers = LocalKVStore(self.store, kv, self.layout)
            shared = redis is not None
        else:
            shared = True  # the host's kvstore: other engines read what this one writes
        self.tiers = tiers
        # KV events of the in-process host tier for routers (the kvstore service
        # reports its own).
        self._host_events = HostTierEvents(block_tokens=block_manager.block_size) if self.store is not None else None
        if self.store is not None:
            self.store.host_events = self._host_events
        # Write-through by default wherever someone else can read the blocks.
        self.write_through = config.write_through if config.write_through is not None else shared
        self._gb_per_s = {"host": config.host_gb_per_s, "ssd": config.ssd_gb_per_s, "redis": config.redis_gb_per_s}
        self._prefill_rate = config.prefill_tokens_per_s  # tokens/s; learned when None
        # False: restore whatever the tiers hold, however slow (a benchmark timing the
        # restores the cost model would skip).
        self.use_cost_model = True
        self.stats = OffloadStats()
        block_manager.track_blocks = True
        # Tiers on the network answer on worker threads, never on the step loop.
        background = config.background_tiers if config.background_tiers is not None else tiers.on_network
        self.prefetcher = (
            TierPrefetch(
                tiers, block_manager, self.stats, plan=self._plan, wait_cap=self.wait_cap, before_write=self.demote_evicted
            )
            if background
            else None
        )

    @classmethod
    def create(cls, config: OffloadConfig, kv: torch.Tensor | KVBlocks, block_manager: BlockManager) -> KVOffload | None:
        """The engine's offload as configured: the host's kvstore service if
        `kvstore_host_id` is set and it answers within `kvstore_wait_s`, else the
        in-process tiers if `host_bytes` > 0, else None (no tiers). `kv`: the pool
        tensor, or a tensor-parallel pool's whole-block view."""
        if config.kvstore_host_id:
            from rtpllm.kvstore.client import RemoteKVStore

            remote = RemoteKVStore.connect(
                config.kvstore_nats_url, config.kvstore_host_id, kv, block_manager.namespace,
                wait_s=config.kvstore_wait_s, request_timeout_s=config.kvstore_timeout_s, kv_host=config.kv_host,
            )  # fmt: skip
            if remote is not None:
                log.info("KV tiers: the kvstore of host %s", config.kvstore_host_id)
                return cls(config, kv, block_manager, remote)
            fallback = f"in-process tiers ({config.host_bytes / (1 << 30):.2f} GiB host memory)" if config.host_bytes > 0 else "no KV tiers"
            log.warning("no kvstore answers for host %s within %.1f s: %s", config.kvstore_host_id, config.kvstore_wait_s, fallback)
        return cls(config, kv, block_manager) if config.host_bytes > 0 else None

    # -- into the store --------------------------------------------------------------

    def demote_evicted(self) -> None:
        """Store blocks evicted from the pool since the last call (their KV is intact
        until the next write into them, which this must precede)."""
        evicted = self.bm.take_evicted()
        if evicted:
            self.tiers.store_from([k for k, _ in evicted], [b for _, b in evicted], only_new=True)
            self.stats.demoted_blocks += len(evicted)

    def offer_committed(self) -> None:
        """Write-through: store blocks committed since the last call."""
        committed = self.bm.take_committed()
        if self.write_through and committed:
            self.tiers.store_from([k for k, _ in committed], [b for _, b in committed])
            self.stats.offered_blocks += len(committed)

    # -- out of the store ------------------------------------------------------------

    def prefetch(self, request_id: str, keys: Sequence[bytes], have: int) -> None:
        """A request was added: with background tiers, start looking up its `keys` past
        the `have` blocks the pool holds, so the answer is there when it is admitted."""
        if self.prefetcher is not None:
            self.prefetcher.lookup(request_id, keys, have)

    def prefix_for(self, request_id: str, keys: Sequence[bytes], hit: Sequence[int], admission: int = 0) -> int | None:
        """The scheduler admits a request whose full-block keys (all but the last token)
        are `keys`, of which the pool holds blocks `hit`: restore what the tiers hold
        next. Returns how many blocks were restored and cached, or None while a
        background lookup or restore is still under way (keep the request waiting).
        `admission`: the request's preemption count (background tiers are asked once per
        admission)."""
        if self.prefetcher is not None:
            return self.prefetcher.prefix(request_id, keys, hit, admission)
        return self.extend_prefix(keys, len(hit), set(hit))

    def forget(self, request_id: str) -> None:
        """The request ended: drop its background lookup or restore."""
        if self.prefetcher is not None:
            self.prefetcher.forget(request_id)

    def settle(self) -> None:
        """Once per step, before scheduling: blocks of abandoned restores that have ended
        go back to the pool."""
        if self.prefetcher is not None:
            self.prefetcher.settle()

    def wait_for_tiers(self, timeout_s: float) -> bool:
        """An engine with nothing to run: sleep until a background lookup or restore
        ends (at most `timeout_s`) instead of spinning; False (at once) if none is under way."""
        if self.prefetcher is None or not self.prefetcher.busy:
            return False
        self.prefetcher.wait(timeout_s)
        return True

    def wait_cap(self, num_blocks: int) -> float:
        """How long a request may wait for the tiers about `num_blocks` of its blocks:
        the time recomputing them would take (waiting longer cannot pay), within
        [tier_wait_min_s, tier_wait_max_s]; the maximum while the prefill speed is unknown."""
        if not self._prefill_rate:
            return self.config.tier_wait_max_s
        predicted = num_blocks * self.bm.block_size / self._prefill_rate
        return min(self.config.tier_wait_max_s, max(self.config.tier_wait_min_s, predicted))

    def extend_prefix(self, keys: Sequence[bytes], have: int, protect: set[int]) -> int:
        """On the engine thread (tiers not on the network): `keys`: the request's
        full-block keys it may hit (all but the last token); `have`: how many the pool
        already holds. Restores what the tiers hold after those and returns how many
        blocks were restored and cached."""
        rest = list(keys[have:])
        if not rest:
            return 0
        where = self.tiers.lookup(rest)
        n = self._plan(where)
        if n == 0:
            return 0
        parent = keys[have - 1] if have else None
        block_ids = self.bm.insert_cached(rest[:n], parent, protect)
        if not block_ids:
            return 0
        # insert_cached may have taken free blocks still holding cached prefixes: store
        # them before the restore overwrites them.
        self.demote_evicted()
        good = self.tiers.fetch_into(rest[: len(block_ids)], block_ids)
        if good < len(block_ids):
            self.bm.uncache(block_ids[good:])
            self.stats.failed_restores += len(block_ids) - good
        for tier in where[:good]:
            self.stats.restored_blocks[tier] += 1
        return good

    # -- KV events of the host tier ---------------------------------------------------

    def take_events(self) -> list[KVEvent]:
        """Host-tier events since the last call (the engine sends them with the pool's)."""
        return self._host_events.take() if self._host_events is not None else []

    @property
    def kvstore_host(self) -> str:
        """The host whose kvstore service holds the tiers ("" for in-process tiers)."""
        return self.config.kvstore_host_id if self.store is None else ""

    def host_keys(self) -> list[bytes]:
        """Every block key in the in-process host tier (a router's snapshot); none when
        the tiers are the kvstore service's."""
        return self.store.host.keys() if self.store is not None else []

    def _plan(self, where: Sequence[str]) -> int:
        """How many leading blocks of a chain found in `where` to restore (counting the
        rest as skipped by cost)."""
        n = self.worth_restoring(where) if self.use_cost_model else len(where)
        self.stats.skipped_by_cost += len(where) - n
        return n

    def worth_restoring(self, tiers: Sequence[str]) -> int:
        """The cost model: how many leading blocks of a chain found in `tiers` (one tier
        name per block, as `lookup` gives) are faster to restore than to recompute (per
        block: bytes over the tier's bandwidth vs block_size tokens over the prefill
        speed). Everything while the prefill speed is unknown."""
        rate = self._prefill_rate
        if not rate:
            return len(tiers)
        recompute_s = self.bm.block_size / rate
        n = 0
        for tier in tiers:
            if self.block_bytes / (self._gb_per_s[tier] * 1e9) >= recompute_s:
                break
            n += 1
        return n

    @property
    def prefill_rate(self) -> float | None:
        """Prefill speed (tokens/s) the cost model uses: configured, else learned from
        the engine's prefill steps; None before the first one."""
        return self._prefill_rate

    def gb_per_s(self, tier: str) -> float:
        """Restore bandwidth of `tier` (GB/s) the cost model uses."""
        return self._gb_per_s[tier]

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Learn the prefill speed from a step whose forward pass ran `tokens` prompt
        tokens in `seconds` (device time: a launch returns before the GPU is done)."""
        if self.config.prefill_tokens_per_s is not None or tokens < 64 or seconds <= 0:
            return
        rate = tokens / seconds
        self._prefill_rate = rate if self._prefill_rate is None else 0.8 * self._prefill_rate + 0.2 * rate

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.tiers.close()

    def tier_stats(self) -> dict[str, int]:
        return dict(self.stats.restored_blocks)

