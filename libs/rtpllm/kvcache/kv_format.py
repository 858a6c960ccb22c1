"""Which format each layer's KV is stored in, and the byte layout of a block page.

A layer stores its KV either plain (a float dtype: the model's, or bf16) or quantized
("fp8": e4m3 values, "int8": symmetric int8), each quantized row of `head_dim` values
with one fp32 scale per token per KV head (rtpllm.kernels.kv_quant).

The page of one block of one layer's K (or V) is `block_size * kv_heads * row_bytes`
bytes: plain, `[block_size, kv_heads, head_dim]` of the dtype; quantized,
`[block_size, kv_heads, head_dim]` one-byte values followed by `[block_size, kv_heads]`
fp32 scales (so `row_bytes = head_dim + 4`). The scales live inside the block's own
page: whatever moves a block (prefix-cache reuse, tiers, PD transfers, CUDA IPC) moves
its scales with it, and a uniformly quantized pool is still one tensor
`[layers, 2, blocks + 1, block_size, kv_heads, head_dim + 4]` of bytes, which every
block mover handles as opaque bytes. The values come first so their rows stay 16-byte
aligned for the kernels' vector loads (head_dim a multiple of 16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rtpllm.config import KV_CACHE_DTYPES
from rtpllm.kernels.kv_quant import QUANT_FORMATS, SCALE_DTYPE, storage_dtype

_PLAIN = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SCALE_BYTES = torch.empty((), dtype=SCALE_DTYPE).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_layer_format(choice: str, model_dtype: torch.dtype) -> str:
    """A user choice ("auto", "bf16", "fp8", "int8", or a plain dtype name) as stored:
    "fp8", "int8" or a plain dtype name ("bfloat16")."""
    if choice == "auto":
        return _dtype_name(model_dtype)
    if choice == "bf16":
        return "bfloat16"
    if choice in QUANT_FORMATS or choice in _PLAIN:
        return choice
    raise ValueError(f"unknown KV cache format {choice!r}; use one of {', '.join(KV_CACHE_DTYPES)}")


@dataclass(frozen=True)
class KVCacheSpec:
    """The stored format of every layer's KV: "fp8", "int8" or a plain dtype name."""

    formats: tuple[str, ...]
    # The digest of the plan's key transforms ("" for none): K smoothing
    # (rtpllm.models.k_smoothing) stores k / s and K centering (rtpllm.models.k_centering)
    # k - m, so those layers' blocks are not the untransformed model's.
    k_transform_id: str = ""

    def __post_init__(self) -> None:
        for fmt in self.formats:
            if fmt not in QUANT_FORMATS and fmt not in _PLAIN:
                raise ValueError(f"unknown stored KV format {fmt!r}")

    @classmethod
    def resolve(
        cls,
        num_layers: int,
        model_dtype: torch.dtype,
        kv_cache_dtype: str = "auto",
        skip_layers: Sequence[int] = (),
        plan: Sequence[str] | None = None,
        k_transform_id: str = "",
    ) -> KVCacheSpec:
        """Formats from the engine's options: a per-layer `plan` (rtpllm.kvcache.kv_plan)
        wins over `kv_cache_dtype`; `skip_layers` keep the model's dtype either way."""
        if plan is not None:
            if len(plan) != num_layers:
                raise ValueError(f"the KV cache plan has {len(plan)} layers, the model {num_layers}")
            choices = list(plan)
        else:
            choices = [kv_cache_dtype] * num_layers
        for layer in skip_layers:
            if not 0 <= layer < num_layers:
                raise ValueError(f"--kv-cache-dtype-skip-layers: layer {layer} is not in 0..{num_layers - 1}")
            choices[layer] = "auto"
        return cls(tuple(resolve_layer_format(c, model_dtype) for c in choices), k_transform_id)

    def is_quantized(self, layer: int) -> bool:
        return self.formats[layer] in QUANT_FORMATS

    @property
    def any_quantized(self) -> bool:
        return any(f in QUANT_FORMATS for f in self.formats)

    @property
    def uniform_format(self) -> str | None:
        """The one format of every layer, or None for a mixed (per-layer) plan."""
        return self.formats[0] if len(set(self.formats)) == 1 else None

    def plain_dtype(self, layer: int) -> torch.dtype:
        return _PLAIN[self.formats[layer]]

    def value_dtype(self, layer: int) -> torch.dtype:
        fmt = self.formats[layer]
        return storage_dtype(fmt) if fmt in QUANT_FORMATS else _PLAIN[fmt]

    def namespace_format(self, model_dtype: torch.dtype) -> str:
        """The KV-format part of the block-key namespace: "model" when every layer stores
        the model's dtype (the keys of engines before KV quantization), else a name of
        every layer's format and the scale layout, so blocks of two formats never share
        a key, in any tier or transfer; key transforms add their vectors' digest."""
        smooth = f";ktransform={self.k_transform_id}" if self.k_transform_id else ""
        if all(f == _dtype_name(model_dtype) for f in self.formats):
            return "model" + smooth
        fmt = self.uniform_format
        layers = fmt if fmt is not None else "layers=" + ",".join(self.formats)
        return f"{layers};scales=f32-token-head{smooth}"

    def row_bytes(self, layer: int, head_dim: int) -> int:
        """Bytes of one (token, KV head) row of a page, its scale included."""
        if self.is_quantized(layer):
            return head_dim + _SCALE_BYTES
        return head_dim * torch.empty((), dtype=self.plain_dtype(layer)).element_size()

    def page_bytes(self, layer: int, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        """One block's K (or V) of one layer."""
        return block_size * num_kv_heads * self.row_bytes(layer, head_dim)

    def bytes_per_block(self, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        """K and V of one block across all layers: what the pool is sized by."""
        return sum(2 * self.page_bytes(i, block_size, num_kv_heads, head_dim) for i in range(len(self.formats)))

    def describe(self) -> str:
        fmt = self.uniform_format
        if fmt is not None:
            return fmt
        counts: dict[str, int] = {}
        for f in self.formats:
            counts[f] = counts.get(f, 0) + 1
        return "mixed(" + ", ".join(f"{n}x{f}" for f, n in counts.items()) + ")"


def quantized_views(
    page: torch.Tensor, fmt: str, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [blocks, block_size, Hkv, D] in the format's dtype, scales [blocks,
    block_size, Hkv] fp32) of the byte pages [blocks, block_size, Hkv, D + 4] of one
    layer's K or V: two strided views of the same memory (see the module docstring)."""
    n = page.shape[0]
    flat = page.reshape(n, -1)
    split = block_size * num_kv_heads * head_dim
    values = flat[:, :split].view(n, block_size, num_kv_heads, head_dim).view(storage_dtype(fmt))
    scales = flat[:, split:].view(SCALE_DTYPE).view(n, block_size, num_kv_heads)
    return values, scales
