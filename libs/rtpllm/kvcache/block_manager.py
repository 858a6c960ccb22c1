"""Accounting of KV blocks: per-request block tables, reference counts, the prefix cache
(block key -> block) with LRU eviction of unreferenced blocks, and KV events.

Nothing else in the engine allocates or frees KV blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rtpllm.kvcache.block_hash import BlockExtras, extend_block_keys
from rtpllm.kvcache.events import BlocksRemoved, BlocksStored, KVEvent


class KVRequest(Protocol):
    """What the block manager needs to know of a request. A request may also have a
    `block_extras` attribute (`BlockExtras | None`): what its block keys depend on
    besides the tokens (a multimodal prompt's images)."""

    request_id: str

    @property
    def all_token_ids(self) -> Sequence[int]: ...


def _extras(request: KVRequest) -> BlockExtras | None:
    # Optional on the protocol: text-only requests (and test doubles) do not carry it.
    return getattr(request, "block_extras", None)


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    key: bytes | None = None


@dataclass
class _Table:
    blocks: list[int] = field(default_factory=list)
    # Keys of the request's full blocks, in order (computed lazily, reused across steps).
    keys: list[bytes] = field(default_factory=list)
    # How many leading blocks have been offered to the prefix cache.
    num_committed: int = 0


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks found for a request's prefix; not yet referenced."""

    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass
class CacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_ratio(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    """Fixed pool of `num_blocks` blocks of `block_size` tokens.

    A block is in exactly one of three states: referenced by requests (ref_count > 0),
    free and cached (ref_count 0, key set, findable by prefix lookups), or free and
    empty. Free blocks sit in an LRU queue; allocation takes empty blocks first, then
    evicts the least recently used cached block.
    """

    def __init__(self, num_blocks: int, block_size: int, namespace: bytes, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.namespace = namespace
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self._tables: dict[str, _Table] = {}
        # Tables of finished requests whose KV is still being read (a prefill's KV on its
        # way to a decode instance): referenced, but no longer the request's to grow.
        self._held: dict[str, _Table] = {}
        self._events: list[KVEvent] = []
        # Cached blocks evicted since the last take_evicted(): (key, block id). Their KV
        # is still in the block until the new owner's step writes it (tiered offload).
        self._evicted: list[tuple[bytes, int]] = []
        # Blocks newly committed to the prefix cache since the last take_committed().
        self._committed: list[tuple[bytes, int]] = []
        self.track_blocks = False  # record the two lists above (only when offloading)
        self.stats = CacheStats()

    # -- queries ---------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self._tables[request_id].blocks

    def has_table(self, request_id: str) -> bool:
        return request_id in self._tables

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, request: KVRequest) -> PrefixHit:
        """Longest run of cached full blocks at the start of the request's tokens.

        At most num_tokens - 1 tokens are reported as hits: the last token is always
        computed so the request has logits to sample from.
        """
        tokens = request.all_token_ids
        if not self.enable_prefix_caching:
            return PrefixHit((), 0)
        table = self._tables.setdefault(request.request_id, _Table())
        extend_block_keys(table.keys, tokens, self.block_size, self.namespace, _extras(request))
        max_blocks = (len(tokens) - 1) // self.block_size
        hits = self.cached_block_ids(table.keys[:max_blocks])
        return PrefixHit(tuple(hits), len(hits) * self.block_size)

    def cached_block_ids(self, keys: Sequence[bytes]) -> list[int]:
        """Blocks caching the leading `keys` of a chain, up to the first one not cached."""
        ids: list[int] = []
        for key in keys:
            block_id = self._cached.get(key)
            if block_id is None:
                break
            ids.append(block_id)
        return ids

    # -- allocation ------------------------------------------------------------------

    def allocate(self, request: KVRequest, num_tokens: int, prefix: PrefixHit | None = None) -> bool:
        """Make the request's table cover `num_tokens` tokens, referencing `prefix` first.

        Returns False, changing nothing, when the free pool cannot supply the blocks.
        """
        table = self._tables.setdefault(request.request_id, _Table())
        hit_ids = prefix.block_ids if prefix is not None else ()
        if hit_ids and table.blocks:
            raise ValueError(f"request {request.request_id} already holds blocks; prefix hits apply only once")
        new_needed = self.blocks_needed(num_tokens) - len(table.blocks) - len(hit_ids)
        # Hit blocks that are currently free leave the free pool when referenced.
        revived = sum(1 for b in hit_ids if self._blocks[b].ref_count == 0)
        if max(new_needed, 0) + revived > len(self._free):
            return False
        for block_id in hit_ids:
            self._ref(block_id)
        table.blocks.extend(hit_ids)
        table.num_committed = max(table.num_committed, len(hit_ids))
        if prefix is not None:
            self.stats.queried_tokens += len(request.all_token_ids)
            self.stats.hit_tokens += prefix.num_tokens
        for _ in range(max(new_needed, 0)):
            table.blocks.append(self._take_free_block())
        return True

    def commit(self, request: KVRequest, num_computed_tokens: int) -> None:
        """Offer the request's newly completed full blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[request.request_id]
        num_full = min(num_computed_tokens // self.block_size, len(table.blocks))
        if num_full <= table.num_committed:
            return
        extend_block_keys(table.keys, request.all_token_ids[: num_full * self.block_size], self.block_size, self.namespace, _extras(request))
        stored: list[bytes] = []
        for i in range(table.num_committed, num_full):
            key = table.keys[i]
            block = self._blocks[table.blocks[i]]
            # A block with the same content may already be cached (computed concurrently
            # by another request); keep the first, this copy stays private and unkeyed.
            if key in self._cached or block.key is not None:
                continue
            block.key = key
            self._cached[key] = block.block_id
            stored.append(key)
            if self.track_blocks:
                self._committed.append((key, block.block_id))
        if stored:
            first = table.keys.index(stored[0])
            parent = table.keys[first - 1] if first > 0 else None
            self._events.append(BlocksStored(block_keys=stored, parent_key=parent, num_tokens=len(stored) * self.block_size))
        table.num_committed = num_full

    def truncate(self, request_id: str, num_tokens: int) -> int:
        """Shrink the request's table to the blocks `num_tokens` tokens need, freeing the
        tail (speculative decoding: blocks allocated for rejected draft tokens). Only
        blocks past every committed one can go: committed blocks hold accepted tokens.
        Returns how many blocks were freed."""
        table = self._tables[request_id]
        keep = max(self.blocks_needed(num_tokens), table.num_committed)
        tail = table.blocks[keep:]
        if not tail:
            return 0
        del table.blocks[keep:]
        self._free_table(_Table(blocks=tail))
        return len(tail)

    def free(self, request_id: str) -> None:
        """Release all of the request's blocks (tail first, so tails are evicted first)."""
        table = self._tables.pop(request_id, None)
        if table is not None:
            self._free_table(table)

    def _free_table(self, table: _Table) -> None:
        for block_id in reversed(table.blocks):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.key is None:
                    # Empty blocks are handed out before any cached one is evicted.
                    self._free.move_to_end(block_id, last=False)

    def hold(self, request_id: str) -> list[int]:
        """Keep a finishing request's blocks referenced under its id until `release`;
        `free(request_id)` then finds nothing. Returns the held block ids, in order."""
        if request_id in self._held:
            raise ValueError(f"request {request_id} already holds KV")
        table = self._held[request_id] = self._tables.pop(request_id)
        return list(table.blocks)

    def release(self, request_id: str) -> bool:
        """Drop a hold taken by `hold`; False if there was none."""
        table = self._held.pop(request_id, None)
        if table is None:
            return False
        self._free_table(table)
        return True

    @property
    def num_held(self) -> int:
        return len(self._held)

    def cached_keys(self) -> list[bytes]:
        return list(self._cached)

    def take_evicted(self) -> list[tuple[bytes, int]]:
        evicted, self._evicted = self._evicted, []
        return evicted

    def take_committed(self) -> list[tuple[bytes, int]]:
        committed, self._committed = self._committed, []
        return committed

    def table_keys(self, request_id: str) -> list[bytes]:
        """Keys of the request's full blocks computed so far by find_prefix/commit."""
        table = self._tables.get(request_id)
        return table.keys if table is not None else []

    def insert_cached(self, keys: Sequence[bytes], parent: bytes | None, protect: set[int]) -> list[int]:
        """Take free blocks for `keys` (the continuation of a chain whose last cached key
        is `parent`) and cache them under those keys, unreferenced: the caller fills
        them with KV restored from a lower tier before anything can read them (the next
        step). Never takes a block in `protect` (a prefix hit about to be referenced).
        Returns the block ids, fewer than asked if the free pool runs short."""
        ids: list[int] = []
        for key in keys:
            if key in self._cached:
                break
            block_id = next((b for b in self._free if b not in protect), None)
            if block_id is None:
                break
            del self._free[block_id]
            block = self._evict(block_id)
            block.key = key
            self._cached[key] = block_id
            self._free[block_id] = None  # free and cached, most recently used
            ids.append(block_id)
        if ids:
            self._events.append(BlocksStored(block_keys=list(keys[: len(ids)]), parent_key=parent, num_tokens=len(ids) * self.block_size))
        return ids

    def reserve_restore(self, owner: str, keep: Sequence[int], count: int) -> list[int]:
        """Blocks for a restore from a lower tier that runs in the background: reference
        the prefix hit `keep` (nothing may evict it meanwhile) and take up to `count`
        free blocks, all under `owner` (not a request id) until `free(owner)`. Unlike
        `insert_cached`, the new blocks stay out of the prefix cache and referenced, so
        nothing reads or reuses them while the restore writes them; `cache_restored`
        offers them once their KV has landed. Returns the new block ids: fewer than
        asked when the free pool runs short, none (and nothing changed) when it is empty."""
        if owner in self._tables:
            raise ValueError(f"{owner} already holds blocks")
        revived = sum(1 for b in keep if self._blocks[b].ref_count == 0)
        count = min(count, len(self._free) - revived)
        if count <= 0:
            return []
        table = self._tables[owner] = _Table()
        for block_id in keep:
            self._ref(block_id)
        table.blocks.extend(keep)
        new = [self._take_free_block() for _ in range(count)]
        table.blocks.extend(new)
        return new

    def cache_restored(self, block_ids: Sequence[int], keys: Sequence[bytes], parent: bytes | None) -> int:
        """Offer blocks taken by `reserve_restore`, now holding the KV of `keys` (the
        continuation of a chain whose last key is `parent`), to the prefix cache; they
        become ordinary cached blocks once their owner is freed. A key cached meanwhile
        (a request computed it) keeps its block, and this copy stays private. Returns
        how many were cached."""
        if not self.enable_prefix_caching:
            return 0
        cached = 0
        run: list[bytes] = []
        run_parent = parent
        for block_id, key in zip(block_ids, keys, strict=True):
            block = self._blocks[block_id]
            if key in self._cached or block.key is not None:
                self._stored_run(run, run_parent)
                run, run_parent = [], key
                continue
            block.key = key
            self._cached[key] = block_id
            run.append(key)
            cached += 1
        self._stored_run(run, run_parent)
        return cached

    def _stored_run(self, keys: list[bytes], parent: bytes | None) -> None:
        if keys:
            self._events.append(BlocksStored(block_keys=list(keys), parent_key=parent, num_tokens=len(keys) * self.block_size))

    def uncache(self, block_ids: Sequence[int]) -> None:
        """Drop cached, unreferenced blocks whose restore failed (their KV is not valid)."""
        removed = []
        for block_id in block_ids:
            block = self._blocks[block_id]
            if block.key is None or block.ref_count:
                continue
            del self._cached[block.key]
            removed.append(block.key)
            block.key = None
            self._free.move_to_end(block_id, last=False)
        if removed:
            self._events.append(BlocksRemoved(block_keys=removed))

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def reset_prefix_cache(self) -> bool:
        """Drop every unreferenced cached block; False if some are still referenced."""
        if any(b.ref_count for b in self._blocks):
            return False
        removed = [k for k in self._cached]
        for block in self._blocks:
            block.key = None
        self._cached.clear()
        if removed:
            self._events.append(BlocksRemoved(block_keys=removed))
        return True

    # -- internals -------------------------------------------------------------------

    def _ref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        self._evict(block_id).ref_count = 1
        return block_id

    def _evict(self, block_id: int) -> _Block:
        """Drop a block taken from the free pool out of the prefix cache, if it was in it."""
        block = self._blocks[block_id]
        if block.key is not None:
            del self._cached[block.key]
            self._events.append(BlocksRemoved(block_keys=[block.key]))
            if self.track_blocks:
                self._evicted.append((block.key, block_id))
            block.key = None
        return block

    def check_invariants(self, live_request_ids: set[str] | None = None) -> None:
        """Raise AssertionError if the accounting is inconsistent (used by tests)."""
        refs = [0] * self.num_blocks
        for b in (b for table in self._held.values() for b in table.blocks):
            refs[b] += 1
        for rid, table in self._tables.items():
            if live_request_ids is not None:
                assert rid in live_request_ids, f"table kept for dead request {rid}"
            for b in table.blocks:
                refs[b] += 1
        for block in self._blocks:
            assert block.ref_count == refs[block.block_id], f"block {block.block_id} refcount drift"
            assert (block.ref_count == 0) == (block.block_id in self._free), f"block {block.block_id} free-state drift"
            if block.key is not None:
                assert self._cached.get(block.key) == block.block_id, f"block {block.block_id} key index drift"
        assert len(self._cached) == sum(1 for b in self._blocks if b.key is not None)
