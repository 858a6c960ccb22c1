"""What both ends of a transfer must agree on: the shape, dtype and namespace of a block."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16: the spelling used on the wire."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVLayout:
    """The layout of one block of a KV pool.

    The pool is one tensor [num_layers, 2, num_blocks + 1, block_size, kv_heads, head_dim]
    (`rtpllm.kvcache.kv_pool.KVPool.kv`); block b is `kv[:, :, b]`. Two pools exchange
    blocks only if every field matches, the namespace included (it names model, dtype,
    KV format, TP layout and block size: the same bytes would mean other things elsewhere).
    The number of blocks in each pool is free.
    """

    namespace: bytes
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @classmethod
    def of(cls, kv: torch.Tensor, namespace: bytes) -> KVLayout:
        """The layout of a pool tensor (see the class docstring for its shape)."""
        if kv.dim() != 6 or kv.shape[1] != 2:
            raise ValueError(
                f"a KV pool is [layers, 2, blocks, block_size, kv_heads, head_dim]; got shape {tuple(kv.shape)}"
            )
        layers, _, _, block_size, heads, head_dim = kv.shape
        return cls(bytes(namespace), layers, block_size, heads, head_dim, dtype_name(kv.dtype))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def block_layer_bytes(self) -> int:
        """K and V of one block in one layer: the unit every payload is made of."""
        elem = torch.empty((), dtype=self.torch_dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    def check_pool(self, kv: torch.Tensor) -> None:
        """Raise ValueError unless `kv` is a contiguous pool of this layout."""
        got = KVLayout.of(kv, self.namespace)
        if got != self:
            raise ValueError(f"pool does not match its layout: {got.mismatch(self, 'pool', 'layout')}")
        if not kv.is_contiguous():
            raise ValueError("the KV pool must be contiguous")

    def mismatch(self, other: KVLayout, mine: str = "sender", theirs: str = "receiver") -> str | None:
        """None if equal, else every differing field with both values."""
        diffs = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                if isinstance(a, bytes):
                    a, b = a.hex(), b.hex()
                diffs.append(f"{f.name}: {mine}={a} {theirs}={b}")
        if diffs and (self.namespace != other.namespace or self.dtype != other.dtype):
            # The namespace is a digest: say what it names. fp8/int8 pools are uint8 pages.
            diffs.append(
                "(the namespace names model, dtype, KV cache format (--kv-cache-dtype / --kv-cache-plan), "
                "TP size and block size: both ends must use the same)"
            )
        return "; ".join(diffs) or None
