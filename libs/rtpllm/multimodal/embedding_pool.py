"""Image embeddings as blocks of a one-layer "KV pool", so the KV data plane and the
kvstore tiers move and keep them as they do KV (ARCHITECTURE rule 2: bulk tensors go
over the data plane, never over NATS).

The pool is a tensor [1, 2, num_blocks, R, 1, hidden]: block b holds 2R embedding rows,
R in its "K" half and R in its "V" half. An image of n rows takes ceil(n / 2R)
consecutive logical blocks (any physical ids), its rows in order, the last block
zero-padded. Both ends of a transfer use this module, so they agree on the mapping; the
namespace names the weights, dtype and R, so a pool of another model or shape refuses
the transfer at its handshake (transfer.KVLayout).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from rtpllm.kvcache.block_hash import KEY_BYTES, chain_key
from rtpllm.transfer.layout import KVLayout, dtype_name

ROWS_PER_HALF = 16  # R: 32 rows a block (98 KiB at hidden 1536 in bf16)


def embedding_namespace(weights: str, dtype: torch.dtype, hidden_size: int, rows_per_half: int = ROWS_PER_HALF) -> bytes:
    """The namespace of a model's image embeddings: who may exchange them. `weights`:
    rtpllm.loader.checkpoint_digest.weights_identity of the checkpoint (engines and
    vision services compute it the same way)."""
    text = f"rtpllm-emb-v1|model={weights}|dtype={dtype_name(dtype)}|hidden={hidden_size}|rows={rows_per_half}"
    return hashlib.blake2b(text.encode(), digest_size=KEY_BYTES).digest()


def embedding_keys(namespace: bytes, content_hash: str, num_blocks: int) -> list[bytes]:
    """The kvstore keys of an image's embedding blocks: a chain seeded by the namespace
    and the image's content hash (a prefix lookup then answers "all blocks stored")."""
    parent = chain_key(namespace, [], b"image:" + content_hash.encode())
    keys = []
    for i in range(num_blocks):
        parent = chain_key(parent, [i])
        keys.append(parent)
    return keys


class EmbeddingPool:
    """A fixed pool of embedding blocks with a free list (not thread-safe: one owner
    thread or event loop)."""

    def __init__(
        self,
        num_blocks: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: str | torch.device,
        namespace: bytes,
        rows_per_half: int = ROWS_PER_HALF,
    ) -> None:
        if num_blocks < 1:
            raise ValueError("an embedding pool needs at least one block")
        self.rows_per_half = rows_per_half
        self.rows_per_block = 2 * rows_per_half
        self.hidden_size = hidden_size
        self.kv = torch.zeros(1, 2, num_blocks, rows_per_half, 1, hidden_size, dtype=dtype, device=device)
        self.layout = KVLayout.of(self.kv, namespace)
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @classmethod
    def of_bytes(
        cls, nbytes: int, hidden_size: int, dtype: torch.dtype, device: str | torch.device, namespace: bytes
    ) -> EmbeddingPool:
        """A pool of about `nbytes` (at least one block)."""
        block = 2 * ROWS_PER_HALF * hidden_size * torch.empty((), dtype=dtype).element_size()
        return cls(max(1, nbytes // block), hidden_size, dtype, device, namespace)

    @property
    def block_bytes(self) -> int:
        return self.rows_per_block * self.hidden_size * self.kv.element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_rows: int) -> int:
        return -(-num_rows // self.rows_per_block)

    def alloc(self, count: int) -> list[int] | None:
        """`count` free block ids, or None (nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        return [self._free.pop() for _ in range(count)]

    def free(self, ids: Sequence[int]) -> None:
        self._free.extend(ids)

    def write(self, ids: Sequence[int], rows: torch.Tensor) -> None:
        """Store embedding rows [n, hidden] into blocks `ids` (enough for n rows)."""
        n = len(ids)
        if rows.shape[0] > n * self.rows_per_block or rows.shape[-1] != self.hidden_size:
            raise ValueError(f"{tuple(rows.shape)} rows do not fit {n} blocks of {self.rows_per_block}x{self.hidden_size}")
        padded = rows.new_zeros(n * self.rows_per_block, self.hidden_size)
        padded[: rows.shape[0]] = rows
        # [n, 2, R, 1, H] -> [2, n, R, 1, H]: the pool's (half, block) order.
        halves = padded.view(n, 2, self.rows_per_half, 1, self.hidden_size).transpose(0, 1)
        index = torch.tensor(list(ids), dtype=torch.long, device=self.kv.device)
        self.kv[0].index_copy_(1, index, halves.to(self.kv.device, self.kv.dtype))

    def read(self, ids: Sequence[int], num_rows: int) -> torch.Tensor:
        """A copy of the first `num_rows` rows stored in blocks `ids`, [num_rows, hidden]."""
        index = torch.tensor(list(ids), dtype=torch.long, device=self.kv.device)
        halves = self.kv[0].index_select(1, index)  # [2, n, R, 1, H]
        return halves.transpose(0, 1).reshape(-1, self.hidden_size)[:num_rows].clone()
