"""Prefill / extend attention: each sequence's new query tokens attend causally to its
cached paged prefix plus the new tokens themselves, all sequences in one launch.

Design (flash-attention forward over two key sources):
- grid (q_heads, m_blocks, sequences). Heads vary fastest so the query heads sharing a KV
  head run side by side and their K/V tiles are served from L2 rather than HBM. The m-block
  order is reversed so the longest (last, most keys) tiles of a sequence start first.
- phase 1 streams the cached prefix (positions 0 .. prefix_len-1, prefix_len = seq_len -
  q_len) from the paged cache with a per-token block lookup: no causal mask is needed there.
- phase 2 streams the new tokens' K/V straight from the k/v inputs: the tiles before the
  diagonal block without a mask, then the diagonal block with the causal mask.
- the new K/V rows are stored into the cache by the first query head of each KV group
  (fused KV write): nothing in this launch reads those slots back, so there is no race.
- or, with NEW_FROM_CACHE, the caller has stored the new rows already (the store
  kernel) and phase 2 reads them from the cache like the prefix, with no write.

Variable lengths cost no host work: a program reads its sequence's bounds on the device
and exits when its m-block lies past the sequence's new tokens.

Quantized KV (fp8 / int8 with an fp32 scale per token and KV head, kernels/kv_quant.py):
cached tiles are widened exactly to the query's dtype and their scales folded into the
scores (K) and the probabilities (V), as in the decode kernel. New tokens' tiles are
quantized in-register the way the fused write stores them, so a token is attended to
identically whether it is new in this step or read from the cache later (chunked
prefill and prefix-cache hits give the same results as one whole prefill). Every
program that reads a new tile quantizes it again; NEW_FROM_CACHE reads the stored one
(triton_backend.QUANT_EXTEND_STORE_FIRST).
"""

from __future__ import annotations

import math

import torch

from rtpllm.kernels._triton import cdiv, dot_precision, next_power_of_2, tl, triton, use_triton
from rtpllm.kernels.attention_ref import gather_context, reference_attention
from rtpllm.kernels.kv_cache import store_kv_ref
from rtpllm.kernels.kv_quant import (
    V_MUL,
    format_of,
    kernel_scales,
    quantize_rows,
    roundtrip_ref,
    scale_strides,
)


@triton.jit
def _tile_update(
    q,
    k,
    v,
    ks,
    vs,
    keep,
    m_i,
    l_i,
    acc,
    sm_scale_log2,
    APPLY_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    QUANT: tl.constexpr,
    V_MUL: tl.constexpr,
):
    """One online-softmax step of a [BLOCK_M] query tile over a [BLOCK_N] key tile.
    Quantized (QUANT != 0): k, v are raw fp8/int8 tiles and ks, vs their [BLOCK_N] scales;
    the values accumulate V_MUL times too large (kv_quant.V_MUL), divided out at the end."""
    if QUANT != 0:
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * (ks * sm_scale_log2)[None, :]
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
    if APPLY_MASK:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row may have seen no allowed key yet (sliding window): keep the exponents finite.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if QUANT != 0:
        pv = (p * (vs * V_MUL)[None, :]).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(pv, v.to(q.dtype), input_precision=PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _cached_tile(
    K_cache, V_cache, K_scale, V_scale, table, pos, mask_n, kvh, offs_d, mask_d,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh, sm_scale_log2,
    PAGE_SIZE: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    """The K and V tiles at positions `pos` from the paged cache (per-token block lookup),
    with their per-token scales when quantized (else placeholders)."""
    blk = tl.load(table + pos // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
    within = pos % PAGE_SIZE
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(
        K_cache + (blk * stride_kcb + within * stride_kct + kvh * stride_kch)[:, None] + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V_cache + (blk * stride_vcb + within * stride_vct + kvh * stride_vch)[:, None] + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    ks = sm_scale_log2
    vs = sm_scale_log2
    if QUANT != 0:
        ks = tl.load(K_scale + blk * stride_ksb + within * stride_kst + kvh * stride_ksh, mask=mask_n, other=0.0)
        vs = tl.load(V_scale + blk * stride_vsb + within * stride_vst + kvh * stride_vsh, mask=mask_n, other=0.0)
    return k, v, ks, vs


@triton.jit
def _input_tile(
    K, V, krows, kv_mask, kvh, offs_d, stride_kt, stride_kh, stride_vt, stride_vh, cache_ty: tl.constexpr,
    QUANT: tl.constexpr,
):  # fmt: skip
    """New tokens' K and V tiles from the k/v inputs, as the cache will hold them:
    quantized in registers with their per-token scales (QUANT != 0), else cast."""
    k = tl.load(K + krows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + krows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    if QUANT != 0:
        kq, ks = quantize_rows(k.to(tl.float32), QUANT)
        vq, vs = quantize_rows(v.to(tl.float32), QUANT)
        return kq, vq, ks, vs
    else:
        return k.to(cache_ty), v.to(cache_ty), 0.0, 0.0


# Ints that change from step to step (decode count, block-table width) are not
# specialised on: each new value class would compile the kernel again mid-serving.
@triton.jit(do_not_specialize=["window", "seq_base", "stride_bt"])
def _extend_kernel(
    Q,
    K,
    V,
    K_cache,
    V_cache,
    Block_tables,
    Query_start_loc,
    Seq_lens,
    Slot_mapping,
    K_scale,
    V_scale,
    Out,
    sm_scale_log2,
    window,
    seq_base,
    stride_qt,
    stride_qh,
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
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SLIDING: tl.constexpr,
    WRITE_KV: tl.constexpr,
    PRECISION: tl.constexpr,
    QUANT: tl.constexpr,
    V_MUL: tl.constexpr,
    NEW_FROM_CACHE: tl.constexpr,
):
    hq = tl.program_id(0)
    mblk = tl.num_programs(1) - 1 - tl.program_id(1)
    b = seq_base + tl.program_id(2)
    q_start = tl.load(Query_start_loc + b)
    q_len = tl.load(Query_start_loc + b + 1) - q_start
    if mblk * BLOCK_M < q_len:
        seq_len = tl.load(Seq_lens + b)
        prefix = seq_len - q_len
        kvh = hq // GROUP
        cache_ty = K_cache.dtype.element_ty
        offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < q_len
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(
            Q + rows[:, None] * stride_qt + hq * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        if QUANT == 0:
            q = q.to(cache_ty)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # Phase 1: the cached prefix. Every prefix key precedes every new query.
        lo1 = 0
        if SLIDING:
            lo1 = tl.maximum(prefix + mblk * BLOCK_M - window + 1, 0)
        table = Block_tables + b.to(tl.int64) * stride_bt
        for n0 in range(lo1, prefix, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < prefix
            k, v, ks, vs = _cached_tile(
                K_cache, V_cache, K_scale, V_scale, table, offs_n, mask_n, kvh, offs_d, mask_d,
                stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh, sm_scale_log2, PAGE_SIZE, QUANT,
            )  # fmt: skip
            keep = mask_n[None, :]
            if SLIDING:
                keep = keep & (offs_n[None, :] > (prefix + offs_m)[:, None] - window)
            m_i, l_i, acc = _tile_update(
                q, k, v, ks, vs, keep, m_i, l_i, acc, sm_scale_log2, True, PRECISION, QUANT, V_MUL
            )

        # Phase 2: the new tokens (index j = position - prefix), from the k/v inputs, or
        # with NEW_FROM_CACHE from the cache, where the caller has stored them already.
        diag = mblk * BLOCK_M
        lo2 = 0
        if SLIDING:
            # Aligned down so these tiles end exactly at the diagonal block.
            lo2 = (tl.maximum(diag - window + 1, 0) // BLOCK_N) * BLOCK_N
        # 2a: tiles wholly before the diagonal: causal holds for every pair, no mask.
        for n0 in range(lo2, diag, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            keep = offs_n[None, :] > offs_m[:, None] - window
            if NEW_FROM_CACHE:
                k, v, ks, vs = _cached_tile(
                    K_cache, V_cache, K_scale, V_scale, table, prefix + offs_n, offs_n < q_len, kvh, offs_d, mask_d,
                    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                    stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh, sm_scale_log2, PAGE_SIZE, QUANT,
                )  # fmt: skip
            else:
                # No key mask: these tiles end at the diagonal, inside the sequence.
                k, v, ks, vs = _input_tile(
                    K, V, (q_start + offs_n).to(tl.int64), mask_d[None, :], kvh, offs_d,
                    stride_kt, stride_kh, stride_vt, stride_vh, cache_ty, QUANT,
                )  # fmt: skip
            m_i, l_i, acc = _tile_update(q, k, v, ks, vs, keep, m_i, l_i, acc, sm_scale_log2, SLIDING, PRECISION, QUANT, V_MUL)
        # 2b: the diagonal block, causally masked.
        hi2 = tl.minimum(q_len, diag + BLOCK_M)
        for n0 in range(diag, hi2, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < hi2
            keep = mask_n[None, :] & (offs_n[None, :] <= offs_m[:, None])
            if SLIDING:
                keep = keep & (offs_n[None, :] > offs_m[:, None] - window)
            if NEW_FROM_CACHE:
                k, v, ks, vs = _cached_tile(
                    K_cache, V_cache, K_scale, V_scale, table, prefix + offs_n, mask_n, kvh, offs_d, mask_d,
                    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                    stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh, sm_scale_log2, PAGE_SIZE, QUANT,
                )  # fmt: skip
            else:
                k, v, ks, vs = _input_tile(
                    K, V, (q_start + offs_n).to(tl.int64), mask_n[:, None] & mask_d[None, :], kvh, offs_d,
                    stride_kt, stride_kh, stride_vt, stride_vh, cache_ty, QUANT,
                )  # fmt: skip
            m_i, l_i, acc = _tile_update(q, k, v, ks, vs, keep, m_i, l_i, acc, sm_scale_log2, True, PRECISION, QUANT, V_MUL)

        l_safe = tl.where(l_i > 0, l_i, 1.0)
        if QUANT != 0:
            o = acc / (l_safe * V_MUL)[:, None]  # values accumulated V_MUL times too large
        else:
            o = acc / l_safe[:, None]
        tl.store(
            Out + rows[:, None] * stride_ot + hq * stride_oh + offs_d[None, :],
            o.to(Out.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )

        if WRITE_KV:
            if hq % GROUP == 0:
                slots = tl.load(Slot_mapping + rows, mask=mask_m, other=-1).to(tl.int64)
                ok = mask_m & (slots >= 0)
                w_mask = ok[:, None] & mask_d[None, :]
                blk_w = slots // PAGE_SIZE
                off_w = slots % PAGE_SIZE
                kn = tl.load(
                    K + rows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=w_mask, other=0.0
                )
                vn = tl.load(
                    V + rows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=w_mask, other=0.0
                )
                if QUANT != 0:
                    kn, kn_scale = quantize_rows(kn.to(tl.float32), QUANT)
                    vn, vn_scale = quantize_rows(vn.to(tl.float32), QUANT)
                    tl.store(
                        K_scale + blk_w * stride_ksb + off_w * stride_kst + kvh * stride_ksh,
                        kn_scale,
                        mask=ok,
                    )
                    tl.store(
                        V_scale + blk_w * stride_vsb + off_w * stride_vst + kvh * stride_vsh,
                        vn_scale,
                        mask=ok,
                    )
                tl.store(
                    K_cache
                    + (blk_w * stride_kcb + off_w * stride_kct + kvh * stride_kch)[:, None]
                    + offs_d[None, :],
                    kn.to(cache_ty),
                    mask=w_mask,
                )
                tl.store(
                    V_cache
                    + (blk_w * stride_vcb + off_w * stride_vct + kvh * stride_vch)[:, None]
                    + offs_d[None, :],
                    vn.to(cache_ty),
                    mask=w_mask,
                )


# (BLOCK_M, BLOCK_N, num_warps, num_stages) forced by bench/attention.py --sweep.
CONFIG_OVERRIDE: tuple[int, int, int, int] | None = None


def extend_config(
    head_dim: int, dtype: torch.dtype, max_query_len: int, quant: bool = False, from_cache: bool = False
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head size and cache dtype.

    BLOCK_M must be a multiple of BLOCK_N (the unmasked tiles end at the diagonal). Each
    choice compiles for sm_90a without register spills (ptxas -v; docs/kernels.md): e.g.
    (128, 64, 8, 3) at D=128 uses 242 registers and 128 KB of shared memory (one program
    per SM), while 4 warps or 128-wide key tiles spill.
    """
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    if quant and from_cache and dtype != torch.float32 and 64 < head_dim <= 128:
        # Every tile from the quantized cache (new_from_cache): bf16's 128-row launch
        # compiles without spills at D=128; 64-row tiles of 64 keys spill 4-12 bytes
        # whatever the warps and stages, 32 keys do not.
        return (64, 32, 4, 3) if max_query_len <= 64 else (128, 64, 8, 3)
    if quant and dtype != torch.float32 and head_dim > 64 and head_dim <= 128:
        # Quantizing the new tokens' tiles in registers needs more of them: at D=128,
        # (128, 64, 8, 3) spills 16 bytes and (128, 64, 8, 2) 4; 64-row tiles do not.
        return 64, 64, 8, 3
    if dtype == torch.float32:  # CUDA-core fp32 dots (tests only): small tiles
        return (32, 16, 4, 2) if head_dim <= 64 else (16, 16, 4, 2)
    if head_dim > 128:
        return 64, 32, 8, 2
    if max_query_len <= 64:  # decode-sized chunks: don't pad to 128 rows
        return (64, 64, 4, 3) if head_dim <= 64 else (64, 64, 8, 3)
    return 128, 64, 8, 3


def paged_extend_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_mapping: torch.Tensor | None,
    scale: float,
    sliding_window: int | None,
    max_query_len: int,
    seq_base: int = 0,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    new_from_cache: bool = False,
) -> torch.Tensor:
    """Triton version of `paged_extend_attention_ref` (same arguments and result).

    `new_from_cache`: the new tokens' K/V are in the cache already (the caller stored
    them, quantized where the cache is); they are read from there, not from k/v, and
    not written (pass no slot_mapping). The same values as the fused path: its
    in-register quantization is the store kernel's."""
    assert not (new_from_cache and slot_mapping is not None), "new_from_cache: the caller stores the KV"
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0] - seq_base
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs <= 0 or num_tokens == 0 or max_query_len <= 0:
        return out
    for t in (q, k, v, k_cache, v_cache, out):
        assert t.stride(-1) == 1, "head_dim must be contiguous"
    quant, k_scale, v_scale = kernel_scales(k_cache, k_scale, v_scale, seq_lens)
    # Quantized tiles are widened to the query's dtype: size the tiles for that.
    dot_dtype = q.dtype if quant else k_cache.dtype
    block_m, block_n, num_warps, num_stages = extend_config(head_dim, dot_dtype, max_query_len, bool(quant), new_from_cache)
    grid = (num_heads, cdiv(max_query_len, block_m), num_seqs)
    _extend_kernel[grid](
        q,
        k,
        v,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        slot_mapping if slot_mapping is not None else query_start_loc,
        k_scale,
        v_scale,
        out,
        scale * math.log2(math.e),
        sliding_window or 0,
        seq_base,
        q.stride(0),
        q.stride(1),
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
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=num_heads // num_kv_heads,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=next_power_of_2(head_dim),
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        SLIDING=sliding_window is not None,
        WRITE_KV=slot_mapping is not None,
        PRECISION=dot_precision(dot_dtype),
        QUANT=quant,
        V_MUL=V_MUL[quant],
        NEW_FROM_CACHE=new_from_cache,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def paged_extend_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_mapping: torch.Tensor | None,
    scale: float,
    sliding_window: int | None,
    max_query_len: int,
    seq_base: int = 0,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Extend attention in plain torch (loops on the host).

    q: [T, Hq, D] and k/v: [T, Hkv, D] packed by `query_start_loc` [B+1]; sequence i's
    q_len new tokens sit at positions seq_len_i - q_len .. seq_len_i - 1 and their prefix
    is in the cache. Only sequences seq_base..B-1 are processed (the backend puts decodes
    first and hands them to the decode kernel); their new K/V are stored at `slot_mapping`
    [T] (when given; slots < 0 skipped) and their rows of `out` written; other rows of
    `out` are left untouched. A quantized cache (fp8/int8) comes with `k_scale`/`v_scale`
    [num_blocks, block_size, Hkv]; attention then runs on dequantized K/V, the new
    tokens' through the same quantization as the store.
    """
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    first, last = qsl[seq_base], qsl[-1]
    if slot_mapping is not None:
        store_kv_ref(k[first:last], v[first:last], k_cache, v_cache, slot_mapping[first:last], k_scale, v_scale)
    fmt = format_of(k_cache)
    new_dtype = torch.float32 if fmt is not None else k_cache.dtype
    for i in range(seq_base, len(lens)):
        start, end = qsl[i], qsl[i + 1]
        if end == start:
            continue
        q_len, seq_len = end - start, lens[i]
        prefix = seq_len - q_len
        # The new tokens come from k/v, the prefix from the cache (as the kernel does), so
        # the reference also holds when no slots are written.
        k_new = roundtrip_ref(k[start:end], fmt, new_dtype).to(new_dtype)
        v_new = roundtrip_ref(v[start:end], fmt, new_dtype).to(new_dtype)
        k_ctx = torch.cat([gather_context(k_cache, block_tables[i], prefix, k_scale), k_new])
        v_ctx = torch.cat([gather_context(v_cache, block_tables[i], prefix, v_scale), v_new])
        out[start:end] = reference_attention(q[start:end], k_ctx, v_ctx, scale, sliding_window)
    return out


def paged_extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_mapping: torch.Tensor | None,
    scale: float,
    sliding_window: int | None,
    max_query_len: int,
    seq_base: int = 0,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA, the torch reference elsewhere."""
    fn = paged_extend_attention_triton if use_triton(q) else paged_extend_attention_ref
    return fn(
        q,
        k,
        v,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        slot_mapping,
        scale,
        sliding_window,
        max_query_len,
        seq_base,
        out,
        k_scale,
        v_scale,
    )
