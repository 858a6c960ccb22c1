"""Allocation of the paged KV memory itself (the block manager does the accounting)."""

from __future__ import annotations

import torch

from rtpllm.models.config import ModelConfig
from rtpllm.parallel.layout import local_kv_heads


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """K and V of one block across all layers (of one rank's KV heads with tensor parallelism)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * local_kv_heads(config, tp_size) * config.head_dim * elem


class KVPool:
    """One tensor [layers, 2, num_blocks, block_size, kv_heads, head_dim].

    Layer-major so a layer's K (or V) is one strided view that attention kernels index by
    block id, and a transfer can ship layer by layer while the next layer computes.

    One extra block past `num_blocks`, never handed out by the block manager, is the
    scratch block: padded rows of a CUDA-graph batch write their K/V there.

    With tensor parallelism (`tp_size` > 1) each rank's pool holds its own KV heads
    (rtpllm.parallel.layout), with the same blocks: rank 0's block manager decides for all.
    """

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str, tp_size: int = 1
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.scratch_block = num_blocks
        self.kv = torch.zeros(
            config.num_layers, 2, num_blocks + 1, block_size, local_kv_heads(config, tp_size), config.head_dim,
            dtype=dtype, device=device,
        )

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.kv[i, 0], self.kv[i, 1]) for i in range(self.kv.shape[0])]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
