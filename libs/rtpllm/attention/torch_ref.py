"""Reference attention in plain PyTorch over the paged layout (CPU and CUDA).

It loops over sequences on the host: simple and exact, the baseline every faster
backend is tested against.
"""

from __future__ import annotations

import torch

from rtpllm.attention.backend import AttentionBackend, AttentionMetadata, register_backend
from rtpllm.kernels.attention_ref import gather_context, reference_attention
from rtpllm.kernels.kv_cache import store_kv_ref
from rtpllm.kernels.kv_quant import format_of

__all__ = ["TorchReferenceBackend", "gather_context", "reference_attention", "write_kv"]


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each new token's K/V at its flat slot."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if format_of(k_cache) is None:
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:  # quantized pages are strided views: no flat index_copy_
            store_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        if out is None:
            out = torch.empty_like(q)
        qsl = meta.query_start_loc_host
        for i, seq_len in enumerate(meta.seq_lens_host):
            start, end = qsl[i], qsl[i + 1]
            table = meta.block_tables[i]
            out[start:end] = reference_attention(
                q[start:end],
                gather_context(k_cache, table, seq_len, k_scale),
                gather_context(v_cache, table, seq_len, v_scale),
                scale,
                sliding_window,
            )
        return out


register_backend("torch", TorchReferenceBackend)
