"""The one block-key function of ARCHITECTURE rule 1, shared by engines, gateway and kvstore.

key_i = H(key_{i-1} || tokens of block i || extras_i), with key_{-1} the namespace key
that names model, dtype, KV format, TP layout and block size. H is 128-bit BLAKE2b:
stable across processes and hosts (Python's hash() is salted per process).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

KEY_BYTES = 16


def namespace_key(
    model: str, dtype: str, block_size: int, kv_format: str = "model", tp_size: int = 1
) -> bytes:
    """Seed of every chain: two engines share cached blocks only if all of these match.
    `model` names the weights by their content (engines pass
    rtpllm.loader.checkpoint_digest.weights_identity), never by a path: KV kept in the
    SSD and Redis tiers outlives the files at that path."""
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


# (block start, block end) -> the extras of that block (see `image_extras`).
BlockExtras = Callable[[int, int], bytes]


def extend_block_keys(
    keys: list[bytes],
    token_ids: Sequence[int],
    block_size: int,
    namespace: bytes,
    extras: BlockExtras | None = None,
) -> list[bytes]:
    """Append keys for every full block of `token_ids` not yet in `keys`; returns `keys`.
    `extras(start, end)`, when given, names what else block [start, end) depends on."""
    parent = keys[-1] if keys else namespace
    for start in range(len(keys) * block_size, len(token_ids) - block_size + 1, block_size):
        extra = extras(start, start + block_size) if extras is not None else b""
        parent = chain_key(parent, token_ids[start : start + block_size], extra)
        keys.append(parent)
    return keys


def block_keys(
    token_ids: Sequence[int], block_size: int, namespace: bytes, extras: BlockExtras | None = None
) -> list[bytes]:
    """Keys of all full blocks of a token sequence."""
    return extend_block_keys([], token_ids, block_size, namespace, extras)


def image_extras(images: Sequence[tuple[str, int, int]], start: int, end: int) -> bytes:
    """Extras of block [start, end) of a prompt with images: the content hash and first
    placeholder offset of every image whose placeholder span [first, last) overlaps it.

    `images` are (content hash, first, last) in prompt order. Placeholder tokens are the
    same for every image of a size, so without this two different images would share
    KV; a block with no image in it gets no extras, so its key is the text key.
    """
    out = b""
    for digest, first, last in images:
        if first < end and last > start:
            raw = digest.encode()
            out += struct.pack("<IH", first, len(raw)) + raw
    return out
