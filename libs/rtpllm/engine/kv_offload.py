"""The engine's side of the KV tiers (ARCHITECTURE rules 1, 3, 6; docs/kvstore.md).

- Demotion: a prefix-cache block evicted from the KV pool is encoded and put in the
  tiered store (host memory, then SSD if reused) before its new owner overwrites it.
- Write-through (with a shared Redis tier): every newly committed full block is offered
  at once, so other instances and later lives of this one find it.
- Restore: when a request's prefix continues past what the pool holds, the blocks found
  in a lower tier are restored into free blocks and cached, if restoring is faster than
  recomputing (bytes / tier bandwidth vs tokens / prefill speed); the scheduler then
  sees them as ordinary prefix hits.

Runs on the engine thread. Encoding and restoring are synchronous here (on CUDA each
waits for the work already queued), which is simple and correct; moving them onto a
side thread is the next step if the copies show up in step times.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rtpllm.config import OffloadConfig
from rtpllm.kvcache.block_manager import BlockManager
from rtpllm.kvstore import HostTier, SSDTier, TieredKVStore, decode_into, encode_blocks
from rtpllm.kvstore.block_codec import InvalidBlock
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


class KVOffload:
    """Moves blocks between one engine's KV pool and a TieredKVStore."""

    def __init__(self, config: OffloadConfig, kv: torch.Tensor, block_manager: BlockManager) -> None:
        self.config = config
        self.kv = kv
        self.bm = block_manager
        self.layout = KVLayout.of(kv, block_manager.namespace)
        self.block_bytes = kv[:, :, 0].numel() * kv.element_size()
        ssd = SSDTier(config.ssd_dir, config.ssd_bytes) if config.ssd_dir and config.ssd_bytes > 0 else None
        redis = None
        if config.redis_url:
            from rtpllm.kvstore.redis_tier import RedisTier

            redis = RedisTier(config.redis_url, ttl_s=config.redis_ttl_s)
        self.store = TieredKVStore(HostTier(config.host_bytes), ssd, redis)
        self.write_through = config.write_through if config.write_through is not None else redis is not None
        self._gb_per_s = {"host": config.host_gb_per_s, "ssd": config.ssd_gb_per_s, "redis": config.redis_gb_per_s}
        self._prefill_rate = config.prefill_tokens_per_s  # tokens/s; learned when None
        self.stats = OffloadStats()
        block_manager.track_blocks = True

    # -- into the store --------------------------------------------------------------

    def demote_evicted(self) -> None:
        """Store blocks evicted from the pool since the last call (their KV is intact
        until the next forward pass, which this must precede)."""
        evicted = [(k, b) for k, b in self.bm.take_evicted() if not self.store.host.contains(k)]
        if evicted:
            self._put(evicted)
            self.stats.demoted_blocks += len(evicted)

    def offer_committed(self) -> None:
        """Write-through: store blocks committed since the last call."""
        committed = self.bm.take_committed()
        if self.write_through and committed:
            self._put(committed)
            self.stats.offered_blocks += len(committed)

    def _put(self, items: Sequence[tuple[bytes, int]]) -> None:
        keys = [k for k, _ in items]
        payloads = encode_blocks(self.kv, [b for _, b in items], self.layout)
        self.store.put_many(keys, payloads)

    # -- out of the store ------------------------------------------------------------

    def extend_prefix(self, keys: Sequence[bytes], have: int, protect: set[int]) -> int:
        """`keys`: the request's full-block keys it may hit (all but the last token);
        `have`: how many the pool already holds. Restores what the tiers hold after
        those and returns how many blocks were restored and cached."""
        rest = list(keys[have:])
        if not rest:
            return 0
        tiers = self.store.lookup(rest)
        n = self._worth_restoring(tiers)
        if n == 0:
            return 0
        parent = keys[have - 1] if have else None
        block_ids = self.bm.insert_cached(rest[:n], parent, protect)
        if not block_ids:
            return 0
        payloads = self.store.get_many(rest[: len(block_ids)])
        good = 0
        while good < len(payloads) and payloads[good] is not None:
            good += 1
        if good:
            try:
                decode_into(self.kv, block_ids[:good], payloads[:good], self.layout, verify_checksum=False)  # type: ignore[arg-type]
            except InvalidBlock as exc:  # the store hands out checked blocks; stay safe anyway
                log.warning("restored KV block failed its check: %s", exc)
                good = exc.index if exc.index is not None else 0
        if good < len(block_ids):
            self.bm.uncache(block_ids[good:])
            self.stats.failed_restores += len(block_ids) - good
        for tier in tiers[:good]:
            self.stats.restored_blocks[tier] += 1
        return good

    def _worth_restoring(self, tiers: Sequence[str]) -> int:
        """Leading blocks whose restore beats recomputing them (per block: bytes over the
        tier's bandwidth vs block_size tokens over the prefill speed)."""
        rate = self._prefill_rate
        recompute_s = self.bm.block_size / rate if rate else 0.0
        n = 0
        for tier in tiers:
            restore_s = self.block_bytes / (self._gb_per_s[tier] * 1e9)
            if rate and restore_s >= recompute_s:
                self.stats.skipped_by_cost += len(tiers) - n
                break
            n += 1
        return n

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """Learn the prefill speed from a step that ran `tokens` prompt tokens."""
        if self.config.prefill_tokens_per_s is not None or tokens < 64 or seconds <= 0:
            return
        rate = tokens / seconds
        self._prefill_rate = rate if self._prefill_rate is None else 0.8 * self._prefill_rate + 0.2 * rate

    def close(self) -> None:
        self.store.close()

    def tier_stats(self) -> dict[str, int]:
        return dict(self.stats.restored_blocks)

