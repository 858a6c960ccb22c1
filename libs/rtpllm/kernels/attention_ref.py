"""Plain-torch attention over the paged layout: the reference every attention kernel and
the torch backend compute with (exact, loops on the host).

It sits beside the kernels (not in rtpllm.attention) so the kernels' `*_ref` functions
take it from their own layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rtpllm.kernels.kv_quant import dequantize_ref, format_of


def gather_context(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """[seq_len, Hkv, D] context of one sequence, read block by block from the cache.
    A quantized cache (fp8/int8) comes with its scales [blocks, block_size, Hkv] and is
    returned dequantized, in fp32."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    ids = block_table[:num_blocks].long()
    fmt = format_of(cache)
    if fmt is None:
        return cache[ids].flatten(0, 1)[:seq_len]
    assert scale is not None, "a quantized cache needs its scales"
    # Gathered as bytes: indexing float8 dtypes is missing from some torch builds.
    values = cache.view(torch.uint8)[ids].flatten(0, 1)[:seq_len].view(cache.dtype)
    return dequantize_ref(values, scale[ids].flatten(0, 1)[:seq_len])


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
