"""How an engine moves blocks of its KV pool into and out of the KV tiers.

Two implementations of one interface: `LocalKVStore`, the engine's own TieredKVStore in
process, and `RemoteKVStore` (client.py), its host's kvstore service reached over NATS
with the blocks on the data plane. `rtpllm.engine.kv_offload` uses either.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from rtpllm.kvstore.block_codec import InvalidBlock, decode_into, encode_blocks
from rtpllm.kvstore.store import TieredKVStore
from rtpllm.transfer.blocks import KVBlocks
from rtpllm.transfer.layout import KVLayout

log = logging.getLogger(__name__)


class EngineKVStore(ABC):
    """The KV tiers as one engine's pool sees them.

    `store_from` is called from the engine thread and never waits on the network.
    `lookup` and `fetch_into` may wait on it when `on_network` is true; the engine then
    calls them from its background threads (rtpllm.engine.tier_prefetch), several at a
    time, so they must be thread-safe. No method raises because a tier or the kvstore
    is slow, gone or returned a bad block (ARCHITECTURE rule 6): a read that fails is a
    miss, a write that fails is dropped, both logged and counted.
    """

    # True when lookups and fetches may wait on the network (a Redis tier, the host's
    # kvstore): ARCHITECTURE rule 8 keeps them off the engine's step loop.
    on_network: bool = False

    @abstractmethod
    def lookup(self, keys: Sequence[bytes]) -> list[str]:
        """Tier ("host", "ssd", "redis") of each key of the longest stored prefix of
        `keys`. Advisory: a block may be gone by the time it is fetched."""

    @abstractmethod
    def fetch_into(self, keys: Sequence[bytes], block_ids: Sequence[int]) -> int:
        """Restore the blocks of `keys` into pool blocks `block_ids` (same length);
        returns how many leading ones were restored. When it returns, nothing writes
        those blocks any more (the caller may reuse the rest at once)."""

    @abstractmethod
    def store_from(self, keys: Sequence[bytes], block_ids: Sequence[int], *, only_new: bool = False) -> None:
        """Store pool blocks `block_ids` under `keys`. Returns once their bytes have been
        read (the caller may overwrite them right after). `only_new`: skip keys the
        store already holds in host memory (an eviction of a block that came from there)."""

    @abstractmethod
    def close(self) -> None:
        """Release the store (flush what it can, bounded)."""

    def stats(self) -> dict[str, Any]:
        return {}


class LocalKVStore(EngineKVStore):
    """An in-process TieredKVStore around one engine's pool: encode/put_many, get_many/decode.

    `kv`: the pool tensor (copied directly), or the `KVBlocks` view of a tensor-parallel
    engine's pool (whole blocks, every rank's KV heads through rank 0) or of a mixed
    per-layer pool (its layer pages): the tiers hold whole blocks either way. Through a view the other ranks read and write their part,
    and one may fail it: that store is dropped, that restore a miss, logged (a broken
    group fails the engine's next step anyway)."""

    def __init__(self, store: TieredKVStore, kv: torch.Tensor | KVBlocks, layout: KVLayout) -> None:
        self.store = store
        self.kv = kv
        self.layout = layout
        self._ranks = isinstance(kv, KVBlocks) and not kv.direct  # blocks pass through other processes
        # Host memory and the SSD index answer at once; Redis is a round trip away.
        self.on_network = store.redis is not None

    def lookup(self, keys: Sequence[bytes]) -> list[str]:
        return self.store.lookup(keys)

    def fetch_into(self, keys: Sequence[bytes], block_ids: Sequence[int]) -> int:
        payloads = self.store.get_many(keys)
        good = 0
        while good < len(payloads) and payloads[good] is not None:
            good += 1
        if not good:
            return 0
        try:
            return self._restore(list(block_ids[:good]), payloads[:good])  # type: ignore[arg-type]
        except Exception:
            if not self._ranks:
                raise
            # Some ranks may hold the blocks, others not: the caller uncaches them all.
            log.exception("restoring KV blocks through the tensor-parallel ranks failed: a miss")
            return 0

    def _restore(self, block_ids: list[int], payloads: list[bytes]) -> int:
        """Decode `payloads` into `block_ids`; how many leading ones were restored."""
        try:
            decode_into(self.kv, block_ids, payloads, self.layout, verify_checksum=False)
            return len(block_ids)
        except InvalidBlock as exc:  # the store hands out checked blocks; stay safe anyway
            log.warning("restored KV block failed its check: %s", exc)
            good = exc.index if exc.index is not None else 0
        if good:  # nothing was written: restore the good prefix alone
            decode_into(self.kv, block_ids[:good], payloads[:good], self.layout, verify_checksum=False)
        return good

    def store_from(self, keys: Sequence[bytes], block_ids: Sequence[int], *, only_new: bool = False) -> None:
        items = list(zip(keys, block_ids, strict=True))
        if only_new:
            items = [(k, b) for k, b in items if not self.store.host.contains(k)]
        if not items:
            return
        try:
            payloads = encode_blocks(self.kv, [b for _, b in items], self.layout)
        except Exception:
            if not self._ranks:
                raise
            log.exception("reading KV blocks through the tensor-parallel ranks failed: %d stores dropped", len(items))
            return
        self.store.put_many([k for k, _ in items], payloads)

    def close(self) -> None:
        self.store.close()

    def stats(self) -> dict[str, Any]:
        return self.store.stats()
