"""KV-cache events an engine emits as its prefix cache changes (fed to the router).

`tier` says which cache changed: "gpu" (the engine's KV pool) or "host" (its in-process
host-memory tier below the pool), so a router can credit a prefix an instance would
restore from host memory instead of recomputing.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec


class BlocksStored(msgspec.Struct, tag="stored", frozen=True):
    """Full blocks newly committed to the prefix cache, in chain order."""

    block_keys: list[bytes]
    parent_key: bytes | None
    num_tokens: int
    tier: str = "gpu"


class BlocksRemoved(msgspec.Struct, tag="removed", frozen=True):
    """Blocks evicted from the prefix cache."""

    block_keys: list[bytes]
    tier: str = "gpu"


class AllBlocksCleared(msgspec.Struct, tag="cleared", frozen=True):
    """The engine dropped its whole cache, every tier (restart, reset)."""


KVEvent = BlocksStored | BlocksRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, frozen=True):
    """Events of one engine step. `seq` increases by one per batch so a gap is detectable."""

    engine_id: str
    seq: int
    events: list[KVEvent]


class CachedKeys(NamedTuple):
    """An engine's whole cache as of its KV event batch `seq` (a router's resync)."""

    gpu: list[bytes]
    host: list[bytes]
    seq: int
