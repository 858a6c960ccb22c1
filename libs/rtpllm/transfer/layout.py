"""What both ends of a transfer must agree on: the shape, dtype and namespace of a block."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16: the spelling used on the wire."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVLayout:
    """The layout of one block of a KV pool.

    A uniform pool (every layer in one format) is one tensor [num_layers, 2, num_blocks +
    1, block_size, kv_heads, head_dim] of `dtype` (`rtpllm.kvcache.kv_pool.KVPool.kv`;
    fp8/int8 pools are uint8 rows of head_dim + 4 bytes, scales included); block b is
    `kv[:, :, b]`, and `layer_formats` is empty.

    A mixed pool (a per-layer KV plan: some layers bf16, others fp8/int8) has one page
    tensor per layer [2, num_blocks + 1, block_size, kv_heads, row bytes of that layer's
    format] (`KVPool.layer_pages()`): `layer_formats` names each layer's stored format
    ("fp8", "int8", "bfloat16", ...; rtpllm.kvcache.kv_format), `head_dim` is the model's
    and `dtype` is "uint8" (payloads are the pages' bytes). Each layer then has its own
    payload size (`layer_bytes`); a whole block is their sum.

    Two pools exchange blocks only if every field matches, the namespace and the
    per-layer formats included (the namespace names model, dtype, KV format, TP layout
    and block size: the same bytes would mean other things elsewhere). The number of
    blocks in each pool is free.
    """

    namespace: bytes
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    layer_formats: tuple[str, ...] = ()

    @classmethod
    def of(cls, kv: torch.Tensor, namespace: bytes) -> KVLayout:
        """The layout of a pool tensor (see the class docstring for its shape)."""
        if kv.dim() != 6 or kv.shape[1] != 2:
            raise ValueError(
                f"a KV pool is [layers, 2, blocks, block_size, kv_heads, head_dim]; got shape {tuple(kv.shape)}"
            )
        layers, _, _, block_size, heads, head_dim = kv.shape
        return cls(bytes(namespace), layers, block_size, heads, head_dim, dtype_name(kv.dtype))

    @classmethod
    def of_layers(
        cls, namespace: bytes, formats: tuple[str, ...], block_size: int, num_kv_heads: int, head_dim: int
    ) -> KVLayout:
        """The layout of a mixed pool whose layer i stores `formats[i]`."""
        return cls(
            bytes(namespace), len(formats), block_size, num_kv_heads, head_dim, "uint8", tuple(formats)
        )

    @property
    def mixed(self) -> bool:
        """True for a pool with per-layer formats (no single pool tensor)."""
        return bool(self.layer_formats)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def block_layer_bytes(self) -> int:
        """K and V of one block in one layer, the same in every layer of a uniform pool;
        ValueError for a mixed one (use `layer_bytes`)."""
        if self.mixed:
            raise ValueError(
                "a mixed per-layer KV layout has no single per-layer size: use layer_bytes(layer)"
            )
        return self._layer_bytes[0]

    def layer_bytes(self, layer: int) -> int:
        """K and V of one block in `layer`: the unit every payload of that layer is made of."""
        return self._layer_bytes[layer]

    @property
    def max_layer_bytes(self) -> int:
        """The largest `layer_bytes`: what a frame must hold for one block of any layer."""
        return max(self._layer_bytes)

    @property
    def block_bytes(self) -> int:
        """One whole block: every layer, K and V."""
        return sum(self._layer_bytes)

    @property
    def layer_offsets(self) -> tuple[int, ...]:
        """Where each layer starts in a whole block's bytes (layer-major, K then V)."""
        offsets, total = [], 0
        for size in self._layer_bytes:
            offsets.append(total)
            total += size
        return tuple(offsets)

    @cached_property
    def _layer_bytes(self) -> tuple[int, ...]:
        if not self.mixed:
            elem = torch.empty((), dtype=self.torch_dtype).element_size()
            return (2 * self.block_size * self.num_kv_heads * self.head_dim * elem,) * self.num_layers
        from rtpllm.kvcache.kv_format import KVCacheSpec  # the one place page sizes are defined

        if len(self.layer_formats) != self.num_layers:
            raise ValueError(f"{len(self.layer_formats)} layer formats for {self.num_layers} layers")
        spec = KVCacheSpec(self.layer_formats)
        return tuple(
            2 * spec.page_bytes(i, self.block_size, self.num_kv_heads, self.head_dim)
            for i in range(self.num_layers)
        )

    def check_pool(self, kv: torch.Tensor) -> None:
        """Raise ValueError unless `kv` is a contiguous pool of this layout."""
        if self.mixed:
            raise ValueError(
                "a mixed per-layer KV layout has no pool tensor: its pool is one page tensor per layer"
            )
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
                elif isinstance(a, tuple):
                    a, b = (",".join(x) if x else "(uniform)" for x in (a, b))
                diffs.append(f"{f.name}: {mine}={a} {theirs}={b}")
        if diffs and (
            self.namespace != other.namespace
            or self.dtype != other.dtype
            or self.layer_formats != other.layer_formats
        ):
            # The namespace is a digest: say what it names. fp8/int8 pools are uint8 pages.
            diffs.append(
                "(the namespace names model, dtype, KV cache format (--kv-cache-dtype / --kv-cache-plan / "
                "--kv-cache-dtype-skip-layers), TP size and block size: both ends must use the same)"
            )
        return "; ".join(diffs) or None
