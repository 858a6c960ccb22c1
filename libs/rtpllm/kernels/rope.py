"""Rotary position embedding on q and k in place, with the optional Qwen3 per-head q/k
RMSNorm fused in front of it.

One program per token reads its q and k heads once, normalises them (when asked), rotates
them with the cos/sin row of its position and writes them back where they were: for the
fused-qkv layout q and k are strided views into the qkv projection's output, so no copy
is made. The eager version makes ~10 passes (norm, gather cos/sin, two halves, negate,
concatenate, multiply, add) over q and k.

With a K shift (`k_shift`, [Hkv, D]: the K centering of a calibrated quantized KV cache,
rtpllm.models.k_centering) the rotated keys have it subtracted before they are written
back, so every consumer of k (the KV store, attention over the fresh keys) sees the
same shifted keys.

The rotate-half (non-interleaved) convention of the Llama/Qwen families is used, and the
reference's rounding steps in the model dtype are reproduced.
"""

from __future__ import annotations

import torch

from rtpllm.kernels._triton import next_power_of_2, tl, triton, use_triton
from rtpllm.kernels.rmsnorm import rms_norm_ref


@triton.jit
def _rope_heads(
    X,
    row,
    stride_t,
    stride_h,
    W,
    cos1,
    sin1,
    cos2,
    sin2,
    eps,
    Shift,
    NUM_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HALF)[None, :]
    ptr1 = X + row * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    if HAS_NORM:
        ss = tl.sum(a * a, 1) + tl.sum(b * b, 1)
        rstd = 1.0 / tl.sqrt(ss / (2 * HALF) + eps)
        w1 = tl.load(W + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
        a = (w1[None, :] * (a * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        b = (w2[None, :] * (b * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    # out = x * cos + rotate_half(x) * sin, each product rounded as the eager ops round it.
    o1 = (a * cos1[None, :]).to(dtype).to(tl.float32) + (-b * sin1[None, :]).to(dtype).to(tl.float32)
    o2 = (b * cos2[None, :]).to(dtype).to(tl.float32) + (a * sin2[None, :]).to(dtype).to(tl.float32)
    if HAS_SHIFT:
        # Rounded to the model dtype first, as the reference's separate subtraction sees it.
        sptr = Shift + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
        s1 = tl.load(sptr, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sptr + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = o1.to(dtype).to(tl.float32) - s1
        o2 = o2.to(dtype).to(tl.float32) - s2
    tl.store(ptr1, o1.to(dtype), mask=mask)
    tl.store(ptr1 + HALF, o2.to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    Positions,
    Cos,
    Sin,
    Qw,
    Kw,
    KShift,
    eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(Positions + row).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    dmask = offs_d < HALF
    cos1 = tl.load(Cos + pos * stride_cos + offs_d, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(Cos + pos * stride_cos + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(Sin + pos * stride_cos + offs_d, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(Sin + pos * stride_cos + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)
    _rope_heads(
        Q,
        row,
        stride_qt,
        stride_qh,
        Qw,
        cos1,
        sin1,
        cos2,
        sin2,
        eps,
        Qw,
        NUM_Q_HEADS,
        BLOCK_HQ,
        HALF,
        BLOCK_HALF,
        HAS_NORM,
        False,
    )
    _rope_heads(
        K,
        row,
        stride_kt,
        stride_kh,
        Kw,
        cos1,
        sin1,
        cos2,
        sin2,
        eps,
        KShift,
        NUM_K_HEADS,
        BLOCK_HK,
        HALF,
        BLOCK_HALF,
        HAS_NORM,
        HAS_SHIFT,
    )


def apply_rope_triton(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `apply_rope_ref`; rotates q and k in place and returns them."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride() == cos.stride()
    assert head_dim % 2 == 0 and cos.shape[-1] == head_dim
    if num_tokens == 0:
        return q, k
    has_norm = q_norm_weight is not None and k_norm_weight is not None
    if k_shift is not None:
        assert k_shift.shape == (num_k_heads, head_dim) and k_shift.is_contiguous()
    half = head_dim // 2
    _rope_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos,
        sin,
        q_norm_weight if has_norm else cos,
        k_norm_weight if has_norm else cos,
        k_shift if k_shift is not None else cos,
        eps,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_k_heads,
        BLOCK_HQ=next_power_of_2(num_q_heads),
        BLOCK_HK=next_power_of_2(num_k_heads),
        HALF=half,
        BLOCK_HALF=next_power_of_2(half),
        HAS_NORM=has_norm,
        HAS_SHIFT=k_shift is not None,
        num_warps=4,
    )
    return q, k


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D], positions: [T], cos/sin: [max_pos, D] tables ->
    (rotated q, rotated k), as new tensors. With norm weights, each head is RMSNormed
    (Qwen3 q_norm / k_norm) before the rotation; with `k_shift` ([Hkv, D]) the rotated
    keys have it subtracted."""
    if q_norm_weight is not None and k_norm_weight is not None:
        q = rms_norm_ref(q, q_norm_weight, eps)
        k = rms_norm_ref(k, k_norm_weight, eps)
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    k = k * c + _rotate_half(k) * s
    if k_shift is not None:
        k = k - k_shift.to(k.dtype)
    return q * c + _rotate_half(q) * s, k


def apply_rope(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher: the in-place Triton kernel on CUDA, the torch reference elsewhere.

    Use the returned tensors: the reference returns new ones, the kernel the inputs.
    """
    if use_triton(q) and q.stride(-1) == 1 and k.stride(-1) == 1 and q.dtype == cos.dtype:
        return apply_rope_triton(positions, q, k, cos, sin, q_norm_weight, k_norm_weight, eps, k_shift)
    return apply_rope_ref(positions, q, k, cos, sin, q_norm_weight, k_norm_weight, eps, k_shift)
