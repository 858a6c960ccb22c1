"""Paged attention for a speculative verify step: several query rows of one sequence read
its KV once.

A verify step packs each of a sequence's k + 1 new tokens as a decode row that ends at
its own position (rtpllm.engine.model_runner); their K/V are in the cache before any row
attends. The decode kernel gives every row its own programs, so a sequence's context is
streamed k + 1 times: at batch 64, k = 4 and 512-token contexts of the Llama-3.1-8B shape,
~21 GB of KV per step instead of ~4.3 GB (docs/speculative_decoding.md).

Here a program owns one *group* of rows (a sequence's rows, consecutive in the batch),
one KV head and one partition of the context. Its query tile is every row times every
query head of the KV head (rows x group, e.g. 5 x 4 = 20 of 32 tile rows at k = 4 on
the 8B shape), so each K/V tile is loaded once and scored for all of them with one
tensor-core dot. Each tile row is masked to its own row's context (row j of k + 1 sees
up to seq_len - k + j), so the result is exactly the decode kernel's per row.

`spans[r]` says where groups start: the number of rows of the group that starts at row
r, 0 for a row inside a group (its group's program writes it). A plain decode row is a
group of 1. Programs of rows inside a group exit at once, so the grid is (rows, KV heads,
splits) as for decode and a captured CUDA graph replays for any grouping whose groups
fit the `max_span` it was captured with. Partitions are merged by the decode kernel's
log-sum-exp reduce, per row.

Quantized KV (fp8 / int8 with per token-head scales) is read as in the decode kernel:
tiles widened to the query's dtype, the K scale folded into the scores and the V scale
into the probabilities.
"""

from __future__ import annotations

import math

import torch

from rtpllm.kernels._triton import cdiv, device_sms, dot_precision, next_power_of_2, tl, triton
from rtpllm.kernels.decode_attention import (
    decode_num_splits,
    f16_dots,
    merge_splits,
    paged_decode_attention_ref,
    split_buffers,
    tile_scores,
    tile_values,
    widen_query_f16,
)
from rtpllm.kernels.kv_quant import V_MUL, kernel_scales, scale_strides

# A group's tile (rows x query heads of a KV head, padded to powers of two) larger than
# this would spill registers: such steps take the per-row decode kernel instead.
MAX_TILE_ROWS = 128
# (BLOCK_N, num_warps, num_stages) forced by a bench sweep; None: verify_config().
CONFIG_OVERRIDE: tuple[int, int, int] | None = None


def verify_tile_rows(group: int, max_span: int) -> int:
    """Rows of a program's query tile: the span's rows times the group's query heads,
    each padded to a power of two, and at least the 16 rows a tensor-core dot needs."""
    return max(16, next_power_of_2(max_span) * next_power_of_2(group))


def verify_fits(num_heads: int, num_kv_heads: int, max_span: int) -> bool:
    """Whether groups of up to `max_span` rows fit one program's tile."""
    return verify_tile_rows(num_heads // num_kv_heads, max_span) <= MAX_TILE_ROWS


def verify_config(tile_rows: int, dtype: torch.dtype, quant: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages), each compiling for sm_90a without register
    spills (tests/gpu/test_compile_sm90.py): the decode kernel's 64-token tiles two deep,
    with 8 warps for 64-row tiles and fp32; a quantized cache (widening, scale folding)
    spills at 64-token tiles and takes 32, one deep."""
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    if quant:
        return 32, 8, 1
    return 64, 8 if tile_rows >= 64 or dtype == torch.float32 else 4, 2


@triton.jit(do_not_specialize=["window", "stride_bt", "stride_mb", "stride_mh", "stride_lb", "stride_lh", "num_splits"])
def _verify_stage1_kernel(
    Q,
    K_cache,
    V_cache,
    Block_tables,
    Seq_lens,
    Spans,
    K_scale,
    V_scale,
    Out,
    Mid_o,
    Mid_lse,
    sm_scale_log2,
    window,
    stride_qt,
    stride_qh,
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
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    num_splits,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SINGLE: tl.constexpr,
    SLIDING: tl.constexpr,
    PRECISION: tl.constexpr,
    QUANT: tl.constexpr,
    V_MUL: tl.constexpr,
    F16_DOTS: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    span = tl.load(Spans + b)
    if span > 0:
        offs_m = tl.arange(0, BLOCK_M)
        r = offs_m // GROUP_P2
        g = offs_m % GROUP_P2
        mask_m = (r < span) & (g < GROUP)
        rows = (b + r).to(tl.int64)
        heads = kvh * GROUP + g
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        cache_ty = K_cache.dtype.element_ty

        # Each tile row attends up to its own row's length; the partitions cover the
        # longest of the group (all rows share one block table).
        row_len = tl.load(Seq_lens + rows, mask=mask_m, other=0)
        seq_len = tl.max(row_len, 0)
        row_lo = tl.zeros([BLOCK_M], dtype=tl.int32)
        start = 0
        if SLIDING:
            row_lo = tl.maximum(row_len - window, 0)
            start = tl.min(tl.where(mask_m, row_lo, seq_len), 0)
        chunk = tl.cdiv(tl.cdiv(seq_len - start, num_splits), BLOCK_N) * BLOCK_N
        lo = start + split * chunk
        hi = tl.minimum(lo + chunk, seq_len)

        q = tl.load(
            Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        if QUANT == 0:
            q = q.to(cache_ty)
        elif F16_DOTS:
            q = widen_query_f16(q)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        table = Block_tables + b.to(tl.int64) * stride_bt
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < hi
            blk = tl.load(table + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
            within = offs_n % PAGE_SIZE
            kv_mask = mask_n[:, None] & mask_d[None, :]
            s = tile_scores(
                q, K_cache, K_scale, blk, within, kvh, offs_d, kv_mask, mask_n,
                stride_kcb, stride_kct, stride_kch, stride_ksb, stride_kst, stride_ksh, sm_scale_log2, PRECISION, QUANT,
            )  # fmt: skip
            valid = mask_n[None, :] & (offs_n[None, :] < row_len[:, None])
            if SLIDING:
                valid = valid & (offs_n[None, :] >= row_lo[:, None])
            s = tl.where(valid, s, float("-inf"))
            # A row may have no key in this tile yet (its context ends before the
            # group's): keep its running max finite so exp2 gives 0, never NaN.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tile_values(
                acc, alpha, p, q, V_cache, V_scale, blk, within, kvh, offs_d, kv_mask, mask_n,
                stride_vcb, stride_vct, stride_vch, stride_vsb, stride_vst, stride_vsh, PRECISION, QUANT, V_MUL,
            )  # fmt: skip
            m_i = m_new

        # Rows with nothing in this partition keep l == 0: zeros, lse -inf.
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        if QUANT != 0:
            o = acc / (l_safe * V_MUL)[:, None]
        else:
            o = acc / l_safe[:, None]
        out_mask = mask_m[:, None] & mask_d[None, :]
        if SINGLE:
            tl.store(
                Out + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                o.to(Out.dtype.element_ty),
                mask=out_mask,
            )
        else:
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(Mid_lse + rows * stride_lb + heads * stride_lh + split, lse, mask=mask_m)
            if lo < hi:
                base = rows * stride_mb + heads * stride_mh + split * stride_ms
                tl.store(Mid_o + base[:, None] + offs_d[None, :], o, mask=out_mask)


def paged_verify_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    spans: torch.Tensor,
    scale: float,
    max_span: int,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    num_groups: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `paged_verify_attention_ref` (same arguments and result).

    q: [R, Hq, D], one query row per decode row, every row's K/V already in the cache;
    spans: [R] int32 (see the module docstring), groups of at most `max_span` rows, whose
    rows share one block table; `num_groups` (host int) sizes the split count like the
    decode kernel's batch. No host synchronisation.
    """
    rows, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    for t in (q, k_cache, v_cache, out):
        assert t.stride(-1) == 1, "head_dim must be contiguous"
    tile_rows = verify_tile_rows(group, max_span)
    assert tile_rows <= MAX_TILE_ROWS, f"groups of {max_span} rows x {group} heads exceed one program's tile"
    quant, k_scale, v_scale = kernel_scales(k_cache, k_scale, v_scale, seq_lens)
    if num_splits is None:
        longest = max_seq_len if max_seq_len is not None else block_tables.shape[1] * page_size
        groups = num_groups if num_groups is not None else cdiv(rows, max_span)
        num_splits = decode_num_splits(groups, num_kv_heads, 1, longest, device_sms(q))
    block_d = next_power_of_2(head_dim)
    block_n, num_warps, num_stages = verify_config(tile_rows, q.dtype, bool(quant))
    mid_o, mid_lse = split_buffers(out, num_splits)
    _verify_stage1_kernel[(rows, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        spans,
        k_scale,
        v_scale,
        out,
        mid_o,
        mid_lse,
        scale * math.log2(math.e),
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
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
        mid_o.stride(0) if num_splits > 1 else 0,
        mid_o.stride(1) if num_splits > 1 else 0,
        mid_o.stride(2) if num_splits > 1 else 0,
        mid_lse.stride(0) if num_splits > 1 else 0,
        mid_lse.stride(1) if num_splits > 1 else 0,
        num_splits,
        GROUP=group,
        GROUP_P2=next_power_of_2(group),
        BLOCK_M=tile_rows,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        SINGLE=num_splits == 1,
        SLIDING=sliding_window is not None,
        PRECISION=dot_precision(q.dtype if quant else k_cache.dtype),
        QUANT=quant,
        V_MUL=V_MUL[quant],
        F16_DOTS=f16_dots(quant, q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        merge_splits(mid_o, mid_lse, out, num_splits)
    return out


def paged_verify_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    spans: torch.Tensor,
    scale: float,
    max_span: int,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    num_groups: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every row attends to its cached context up to its own seq_len: the grouping only
    changes how the kernel reads, so this is the decode reference over the cache."""
    return paged_decode_attention_ref(
        q, None, None, k_cache, v_cache, block_tables, seq_lens, None, scale, sliding_window, out,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip

