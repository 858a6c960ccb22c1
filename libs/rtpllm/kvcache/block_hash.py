"""The one block-key function of ARCHITECTURE rule 1, shared by engines, gateway and kvstore.

key_i = H(key_{i-1} || tokens of block i || extras_i), with key_{-1} the namespace key
that names model, dtype, KV format, TP layout and block size. H is 128-bit BLAKE2b:
stable across processes and hosts (Python's hash() is salted per process).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

KEY_BYTES = 16


def namespace_key(
    model: str, dtype: str, block_size: int, kv_format: str = "model", tp_size: int = 1
) -> bytes:
    """Seed of every chain: two engines share cached blocks only if all of these match."""
    text = f"rtpllm-kv-v1|model={model}|dtype={dtype}|kv={kv_format}|tp={tp_size}|bs={block_size}"
    return hashlib.blake2b(text.encode(), digest_size=KEY_BYTES).digest()


def chain_key(parent: bytes, tokens: Sequence[int], extras: bytes = b"") -> bytes:
    """Key of one full block given its parent's key, its token ids and any extras."""
    h = hashlib.blake2b(parent, digest_size=KEY_BYTES)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    if extras:
        # Length-prefixed so (tokens, extras) pairs cannot collide by shifting bytes.
        h.update(struct.pack("<I", len(extras)))
        h.update(extras)
    return h.digest()


def extend_block_keys(
    keys: list[bytes], token_ids: Sequence[int], block_size: int, namespace: bytes
) -> list[bytes]:
    """Append keys for every full block of `token_ids` not yet in `keys`; returns `keys`."""
    parent = keys[-1] if keys else namespace
    for start in range(len(keys) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = chain_key(parent, token_ids[start : start + block_size])
        keys.append(parent)
    return keys


def block_keys(token_ids: Sequence[int], block_size: int, namespace: bytes) -> list[bytes]:
    """Keys of all full blocks of a token sequence."""
    return extend_block_keys([], token_ids, block_size, namespace)
