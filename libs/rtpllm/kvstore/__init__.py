"""The tiers of the KV store: encoded KV blocks by block key, in host memory, on SSD
and in a shared Redis, so cached prefixes outlive one GPU's memory and one instance's
life. See docs/kvstore.md.

- block_codec: one block of a KV pool <-> bytes (header, CRC-32), zero-copy where it can
- tier: the Tier interface and its counters
- host_tier / ssd_tier / redis_tier: the three tiers
- write_behind: bounded background writes that never block the caller
- store: TieredKVStore, lookups, promotion, demotion
- engine_store: EngineKVStore, the tiers as an engine's pool sees them; LocalKVStore
- staging, service, client: the kvstore service of a host (KVStoreServer) and an
  engine's side of it (RemoteKVStore); imported from their modules (they need NATS)
"""

from rtpllm.kvstore.block_codec import (
    CorruptBlock,
    InvalidBlock,
    LayoutMismatch,
    check_block,
    decode_into,
    encode_blocks,
)
from rtpllm.kvstore.host_tier import Evicted, HostTier
from rtpllm.kvstore.ssd_tier import SSDTier
from rtpllm.kvstore.store import TieredKVStore
from rtpllm.kvstore.tier import Tier, TierStats

__all__ = [
    "CorruptBlock",
    "Evicted",
    "HostTier",
    "InvalidBlock",
    "LayoutMismatch",
    "RedisTier",
    "SSDTier",
    "Tier",
    "TierStats",
    "TieredKVStore",
    "check_block",
    "decode_into",
    "encode_blocks",
]


def __getattr__(name: str) -> object:
    # RedisTier needs the `redis` client (the `serve` extra): imported on first use only.
    if name == "RedisTier":
        from rtpllm.kvstore.redis_tier import RedisTier

        return RedisTier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
