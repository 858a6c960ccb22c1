"""Reference attention in plain PyTorch over the paged layout (CPU and CUDA).

It loops over sequences on the host: simple and exact, the baseline every faster
backend is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rtpllm.attention.backend import AttentionBackend, AttentionMetadata, register_backend


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each new token's K/V at its flat slot."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_context(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """[seq_len, Hkv, D] context of one sequence, read block by block from the cache."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len]


def reference_attention(
    q: torch.Tensor,
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of q [Lq, Hq, D] over the last Lq positions of k/v [L, Hkv, D]."""
    lq, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k_ctx.shape
    group = num_heads // num_kv_heads
    q_pos = torch.arange(seq_len - lq, seq_len, device=q.device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    k_rep = k_ctx.repeat_interleave(group, dim=1).transpose(0, 1)
    v_rep = v_ctx.repeat_interleave(group, dim=1).transpose(0, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k_rep.to(q.dtype), v_rep.to(q.dtype), attn_mask=allowed, scale=scale
    )
    return out.transpose(0, 1)


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
    ) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        qsl = meta.query_start_loc_host
        for i, seq_len in enumerate(meta.seq_lens_host):
            start, end = qsl[i], qsl[i + 1]
            table = meta.block_tables[i]
            out[start:end] = reference_attention(
                q[start:end],
                gather_context(k_cache, table, seq_len),
                gather_context(v_cache, table, seq_len),
                scale,
                sliding_window,
            )
        return out


register_backend("torch", TorchReferenceBackend)
