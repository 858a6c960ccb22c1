"""Host-memory tier: encoded blocks in an LRU bounded by bytes."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rtpllm.kvstore.tier import TierStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evicted:
    """A block leaving the host tier: what the store needs to decide its demotion."""

    key: bytes
    data: bytes
    hits: int
    pinned: bool


@dataclass
class _Entry:
    data: bytes
    hits: int = 0
    pinned: bool = False


class HostTier:
    """Blocks in process memory, least recently used evicted first once the stored
    bytes would exceed `capacity_bytes`.

    Holds the bytes objects it is given (no copy). Each entry counts its hits (gets) and
    carries a `pinned` flag; both go with it to `on_evict(Evicted)`, which the owning
    store uses to demote reused or pinned blocks to SSD. The callback runs on the thread
    that caused the eviction, outside the tier's lock, so it must not block.
    """

    name = "host"

    def __init__(self, capacity_bytes: int, on_evict: Callable[[Evicted], None] | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.on_evict = on_evict
        self.stats = TierStats()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.hits += 1
        if entry is None:
            self.stats.add(misses=1)
            return None
        self.stats.add(hits=1, bytes_read=len(entry.data))
        return entry.data

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    def put(self, key: bytes, data: bytes, *, pinned: bool = False, hits: int = 0) -> None:
        """Store a block (most recently used). A key already present keeps its bytes
        (blocks are immutable) and becomes most recent; `pinned` is or-ed in."""
        size = len(data)
        evicted: list[Evicted] = []
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.pinned |= pinned
                entry.hits = max(entry.hits, hits)
                return
            if size > self.capacity_bytes:
                self.stats.add(dropped_writes=1)
                return
            while self._used + size > self.capacity_bytes:
                old_key, old = self._entries.popitem(last=False)
                self._used -= len(old.data)
                evicted.append(Evicted(old_key, old.data, old.hits, old.pinned))
            self._entries[key] = _Entry(data, hits, pinned)
            self._used += size
        self.stats.add(bytes_written=size, evictions=len(evicted))
        self._notify(evicted)

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        for key, data in items:
            self.put(key, data)

    def pin(self, key: bytes) -> bool:
        """Mark a stored block as pinned (demoted to SSD when evicted, whatever its
        hits); False if it is not here."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            entry.pinned = True
            return True

    def delete(self, key: bytes) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._used -= len(entry.data)

    def clear(self) -> None:
        """Drop everything, without eviction callbacks."""
        with self._lock:
            self._entries.clear()
            self._used = 0

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [k in self._entries for k in keys]

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._entries)

    def close(self) -> None:
        pass

    def _notify(self, evicted: list[Evicted]) -> None:
        if self.on_evict is None:
            return
        for ev in evicted:
            try:
                self.on_evict(ev)
            except Exception:
                log.exception("host tier eviction callback failed for block %s", ev.key.hex())
