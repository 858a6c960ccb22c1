"""KV-cache events an engine emits as its prefix cache changes (fed to the router)."""

from __future__ import annotations

import msgspec


class BlocksStored(msgspec.Struct, tag="stored", frozen=True):
    """Full blocks newly committed to the prefix cache, in chain order."""

    block_keys: list[bytes]
    parent_key: bytes | None
    num_tokens: int


class BlocksRemoved(msgspec.Struct, tag="removed", frozen=True):
    """Blocks evicted from the prefix cache."""

    block_keys: list[bytes]


class AllBlocksCleared(msgspec.Struct, tag="cleared", frozen=True):
    """The engine dropped its whole cache (restart, reset)."""


KVEvent = BlocksStored | BlocksRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, frozen=True):
    """Events of one engine step. `seq` increases by one per batch so a gap is detectable."""

    engine_id: str
    seq: int
    events: list[KVEvent]
