"""The interface every KV tier implements, and the counters each one keeps."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable


@dataclass
class TierStats:
    """Counters of one tier; `add` is thread-safe, `as_dict` a consistent snapshot.

    hits / misses count the keys asked of this tier by `get` / `get_many` (a store asks
    a lower tier only for what the tiers above missed). `corrupt`: stored blocks that
    failed their checks on read (then deleted). `dropped_writes`: writes not done because
    a queue was full, the tier was down or the block was larger than the tier.
    `errors`: failed I/O (also counted as a miss or a dropped write).
    """

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    corrupt: int = 0
    dropped_writes: int = 0
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    @property
    def hit_ratio(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def as_dict(self) -> dict[str, int | float]:
        with self._lock:
            out: dict[str, int | float] = {
                f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"
            }
        asked = out["hits"] + out["misses"]
        out["hit_ratio"] = out["hits"] / asked if asked else 0.0
        return out


@runtime_checkable
class Tier(Protocol):
    """A store of encoded KV blocks by block key (rtpllm.kvcache.block_hash).

    Blocks are immutable: one key always names the same bytes, so a `put` of a key
    already present may keep the stored copy. A block is visible to `get` only once
    written whole (rule 6), and `get` never returns a block that failed its checks: a
    bad block is a miss. No method raises for a tier that is full or unreachable; that
    is a miss (reads) or a dropped write, counted in `stats`. All methods are
    thread-safe.
    """

    name: str
    stats: TierStats

    def get(self, key: bytes) -> bytes | None: ...

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    def put(self, key: bytes, data: bytes) -> None: ...

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def contains(self, key: bytes) -> bool: ...

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]: ...

    def keys(self) -> list[bytes]: ...

    def close(self) -> None: ...
