"""Allocation of the paged KV memory itself (the block manager does the accounting)."""

from __future__ import annotations

import torch

from rtpllm.kvcache.kv_format import KVCacheSpec, quantized_views
from rtpllm.models.config import ModelConfig
from rtpllm.parallel.layout import local_kv_heads

# Layer regions of a mixed-format pool start at this alignment (any dtype view, and the
# kernels' 16-byte vector loads, need it).
_REGION_ALIGN = 256


def default_spec(config: ModelConfig, dtype: torch.dtype) -> KVCacheSpec:
    """Every layer in the model's dtype: the pool before KV quantization."""
    return KVCacheSpec.resolve(config.num_layers, dtype)


def bytes_per_block(
    config: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1, spec: KVCacheSpec | None = None
) -> int:
    """K and V of one block across all layers (of one rank's KV heads with tensor
    parallelism), in the layers' stored formats (quantized pages count their scales)."""
    spec = spec or default_spec(config, dtype)
    return spec.bytes_per_block(block_size, local_kv_heads(config, tp_size), config.head_dim)


class KVPool:
    """The KV memory of one engine (or one tensor-parallel rank).

    Uniform format (every layer the same; the default): one tensor `kv`, layer-major,
    [layers, 2, num_blocks + 1, block_size, kv_heads, head_dim] of the plain dtype, or
    [layers, 2, num_blocks + 1, block_size, kv_heads, head_dim + 4] bytes for fp8 / int8
    (values then scales in each block's page: rtpllm.kvcache.kv_format). Layer-major so
    a layer's K (or V) is one strided view that attention kernels index by block id, and a
    transfer can ship layer by layer while the next layer computes.

    Mixed per-layer formats (a calibrated plan): one byte buffer (`buffer`) with a region
    per layer, and no `kv` tensor (None). The block movers (tiers, PD transfers) see it
    as one page tensor per layer (`layer_pages()`, rtpllm.transfer.blocks.LayerPoolBlocks):
    the same block ids in every layer, each layer's pages in its own format. What needs
    one tensor (tensor parallelism's KV channel) refuses it (`require_uniform`).

    One extra block past `num_blocks`, never handed out by the block manager, is the
    scratch block: padded rows of a CUDA-graph batch write their K/V there.

    With tensor parallelism (`tp_size` > 1) each rank's pool holds its own KV heads
    (rtpllm.parallel.layout), with the same blocks: rank 0's block manager decides for all.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str,
        tp_size: int = 1,
        spec: KVCacheSpec | None = None,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.spec = spec or default_spec(config, dtype)
        self.scratch_block = num_blocks
        heads, head_dim, layers = local_kv_heads(config, tp_size), config.head_dim, config.num_layers
        self.num_kv_heads, self.head_dim = heads, head_dim
        self.buffer: torch.Tensor | None = None  # a mixed pool's one allocation
        if len(self.spec.formats) != layers:
            raise ValueError(f"KV cache spec has {len(self.spec.formats)} layers, the model {layers}")
        self.kv: torch.Tensor | None
        fmt = self.spec.uniform_format
        pages: list[torch.Tensor] = []  # per layer [2, blocks + 1, block_size, heads, row]
        if fmt is not None:
            quantized = self.spec.is_quantized(0)
            self.kv = torch.zeros(
                layers, 2, num_blocks + 1, block_size, heads, head_dim + 4 if quantized else head_dim,
                dtype=torch.uint8 if quantized else self.spec.plain_dtype(0), device=device,
            )
            self.dtype = self.kv.dtype
            pages = [self.kv[i] for i in range(layers)]
            self._nbytes = self.kv.numel() * self.kv.element_size()
        else:
            self.kv = None
            self.dtype = torch.uint8
            sizes = [2 * (num_blocks + 1) * self.spec.page_bytes(i, block_size, heads, head_dim) for i in range(layers)]
            offsets = []
            total = 0
            for size in sizes:
                offsets.append(total)
                total += -(-size // _REGION_ALIGN) * _REGION_ALIGN
            self.buffer = torch.zeros(total, dtype=torch.uint8, device=device)
            self._nbytes = total
            for i, (off, size) in enumerate(zip(offsets, sizes, strict=True)):
                region = self.buffer[off : off + size]
                if self.spec.is_quantized(i):
                    pages.append(region.view(2, num_blocks + 1, block_size, heads, head_dim + 4))
                else:
                    pages.append(region.view(self.spec.plain_dtype(i)).view(2, num_blocks + 1, block_size, heads, head_dim))
        self._pages = pages
        self._caches: list[tuple[torch.Tensor, ...]] = []
        for i, page in enumerate(pages):
            if self.spec.is_quantized(i):
                k, ks = quantized_views(page[0], self.spec.formats[i], block_size, heads, head_dim)
                v, vs = quantized_views(page[1], self.spec.formats[i], block_size, heads, head_dim)
                self._caches.append((k, v, ks, vs))
            else:
                self._caches.append((page[0], page[1]))

    def layer_caches(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer (k_cache, v_cache) [blocks + 1, block_size, kv_heads, head_dim], plus
        (k_scale, v_scale) [blocks + 1, block_size, kv_heads] fp32 for a quantized layer."""
        return list(self._caches)

    def layer_pages(self) -> list[torch.Tensor]:
        """Per layer its pages [2 (K, V), blocks + 1, block_size, kv_heads, row] in the
        layer's stored format (views of `kv` or of `buffer`): what the block movers copy."""
        return list(self._pages)

    def require_uniform(self, what: str) -> torch.Tensor:
        """The pool tensor, for what needs one (tensor parallelism's KV channel); a clear
        error for a mixed-format pool, which has none."""
        if self.kv is None:
            raise ValueError(
                f"{what} needs one KV format for every layer; this pool is {self.spec.describe()} "
                "(a per-layer --kv-cache-plan or --kv-cache-dtype-skip-layers). Use a uniform "
                "--kv-cache-dtype with it (docs/kv_quantization.md)"
            )
        return self.kv

    @property
    def nbytes(self) -> int:
        return self._nbytes
