"""Standalone KV-cache write: store each new token's K/V at its flat cache slot.

The attention kernels fuse this write into their own launch; this one serves the paths
that attend without them (the SDPA prefill path, tests, tools). One program per token
copies every KV head of it, so the launch is a single tiny kernel.

A quantized cache (fp8 / int8 values, `rtpllm.kernels.kv_quant`) comes with scale views
[num_blocks, block_size, kv_heads] fp32: each token's heads are quantized here, in the
write, one scale per (token, head).
"""

from __future__ import annotations

import torch

from rtpllm.kernels._triton import next_power_of_2, tl, triton, use_triton
from rtpllm.kernels.kv_quant import format_of, kernel_scales, quantize_ref, quantize_rows, scale_strides


@triton.jit
def _store_kv_kernel(
    K,
    V,
    K_cache,
    V_cache,
    Slot_mapping,
    K_scale,
    V_scale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    stride_ksb,
    stride_kst,
    stride_ksh,
    stride_vsb,
    stride_vst,
    stride_vsh,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    QUANT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slot_mapping + t).to(tl.int64)
    if slot >= 0:  # slot < 0 marks a padded token (e.g. a CUDA-graph batch filler)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
        blk = slot // PAGE_SIZE
        off = slot % PAGE_SIZE
        k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0)
        if QUANT != 0:
            # Scale views are [blocks, block_size, heads], any strides (stride_ksh: heads).
            k, k_scale = quantize_rows(k.to(tl.float32), QUANT)
            v, v_scale = quantize_rows(v.to(tl.float32), QUANT)
            mask_s = offs_h < NUM_KV_HEADS
            tl.store(
                K_scale + blk * stride_ksb + off * stride_kst + offs_h * stride_ksh, k_scale, mask=mask_s
            )
            tl.store(
                V_scale + blk * stride_vsb + off * stride_vst + offs_h * stride_vsh, v_scale, mask=mask_s
            )
        tl.store(
            K_cache + blk * stride_kcb + off * stride_kct + offs_h[:, None] * stride_kch + offs_d[None, :],
            k.to(K_cache.dtype.element_ty),
            mask=mask,
        )
        tl.store(
            V_cache + blk * stride_vcb + off * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :],
            v.to(V_cache.dtype.element_ty),
            mask=mask,
        )


def store_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Triton version of `store_kv_ref`."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    for t in (k, v, k_cache, v_cache):
        assert t.stride(-1) == 1, "head_dim must be contiguous"
    quant, k_scale, v_scale = kernel_scales(k_cache, k_scale, v_scale, slot_mapping)
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale,
        v_scale,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        *scale_strides(quant, k_scale, v_scale),
        NUM_KV_HEADS=num_kv_heads,
        BLOCK_H=next_power_of_2(num_kv_heads),
        BLOCK_D=next_power_of_2(head_dim),
        HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1],
        QUANT=quant,
        num_warps=4,
    )


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """k, v: [T, Hkv, D] -> cache[slot // block_size, slot % block_size]; slots < 0 skipped.
    A quantized cache (fp8/int8 dtype) also takes the scale views [blocks, block_size, Hkv].

    Indexes (block, offset) pairs rather than a flat view, so any cache strides work.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    fmt = format_of(k_cache)
    if fmt is None:
        k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
        v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)
        return
    assert k_scale is not None and v_scale is not None, "a quantized cache needs its scales"
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        values, scales = quantize_ref(x[keep], fmt)
        # Scattered as bytes: index_put of float8 dtypes is missing from some torch builds.
        cache.view(torch.uint8)[blocks, offsets] = values.view(torch.uint8)
        scale[blocks, offsets] = scales


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Dispatcher: the Triton kernel on CUDA, the torch reference elsewhere."""
    fn = store_kv_triton if use_triton(k) else store_kv_ref
    fn(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
