"""Paged decode attention: one new query token per sequence over its paged KV context.

Design (flash-decoding, GQA-aware):
- Stage 1, grid (batch, kv_heads * head_blocks, num_splits): a program owns one sequence,
  one KV head and the (up to BLOCK_H) query heads that share it, and one contiguous
  partition of the context. It streams that partition's K/V once from the paged cache
  (per-token block lookup, so any block size works) and scores all of the group's query
  heads against it with one tensor-core dot: K/V bytes are read once per KV head, not
  once per query head.
- The new token's K/V is taken from the k/v inputs (not the cache) and, when fused, stored
  into the cache by the program whose partition ends at it: no separate KV-write launch and
  no read-after-write ordering between programs.
- Stage 2, grid (batch, q_heads): merges the partitions by their log-sum-exp. With one
  partition stage 1 writes the output directly and stage 2 is skipped.

Everything that varies between steps (seq_lens, block tables, slots) is read on the device;
the grid depends only on the batch size and `num_splits`, so a captured CUDA graph replays
correctly for any contexts as long as `num_splits` is fixed at capture time. The split
count is a runtime argument (compiled variants: one vs several splits, and the merge per
power-of-two bucket), so a ladder of graph sizes does not compile a kernel per count.

Quantized KV (fp8 / int8 values with an fp32 scale per token and KV head,
rtpllm.kernels.kv_quant): tiles are loaded in their 1-byte format (as 16-bit words where
rows allow) and widened exactly to fp16 or the query's dtype in registers (from words,
the dots run over the even and the odd head dimensions apart, so the widened values go
to the tensor cores without being reordered); the scales are folded in rather than
multiplied into each tile: the K scale into the scores of its key column, the V scale
into the probabilities of its row, so no tile is ever dequantized in memory. The new
token is quantized in-register (stored as such) and attended to as the cache will hold
it.
"""

from __future__ import annotations

import math

import torch

from rtpllm.kernels._triton import (
    INTERPRET,
    cdiv,
    device_sms,
    dot_precision,
    next_power_of_2,
    tl,
    triton,
    use_triton,
)
from rtpllm.kernels.attention_ref import gather_context, reference_attention
from rtpllm.kernels.kv_cache import store_kv_ref
from rtpllm.kernels.kv_quant import V_MUL, kernel_scales, quantize_rows, scale_strides

# A partition shorter than this costs more in the merge than its parallelism earns.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64
WAVE_PROGRAMS_PER_SM = 4
# (BLOCK_N, num_warps, num_stages) forced by bench/attention.py --sweep; None: decode_config().
CONFIG_OVERRIDE: tuple[int, int, int] | None = None
# On: fp8 tiles widen to fp16 for the dots, the query with them (clamped to fp16's
# range; its mantissa has room for bf16's). sm_90 converts two e4m3 values to fp16 in
# one instruction, and to bf16 only through fp16, one more instruction per value. Alone
# it gains nothing (bench/attention.py --scale-layout and --quant-short-decode, H100):
# the conversions are not what bounds the kernel. The verify kernel follows this switch.
FP8_F16_DOTS = False
# On: the decode kernel loads fp8 tiles as 16-bit words and widens them to fp16 in
# registers, two values per instruction, and runs its dots over the even and the odd
# head dimensions apart (q . k = q_even . k_even + q_odd . k_odd; P @ V column by column):
# a word's low byte goes to the even half, its high byte to the odd, so the widened
# values reach the tensor cores as they come out of the widening. The words travel
# global -> shared -> registers by cp.async and ldmatrix as a bf16 tile does. Loaded as
# bytes, Triton fed the tensor cores through byte-wise shared-memory loads (216 per
# 128-token tile, 136 byte permutes), and the kernel was bound by that; widened in pairs
# and interleaved back into rows (session 14), the rows went through shared memory once
# more (74.7 KB a program, against 42 KB now). On an H100 at batch 256 over 100..1,300
# tokens (docs/kv_quantization.md): bytes 0.232 ms, pairs 0.202, halves 0.184 (bf16
# 0.284); the Qwen3-0.6B offline workload 26,673 -> 28,384-29,218 -> 31,235 tok/s; decode
# ITL at 32 x 8k (8B shape) 13.97 -> 12.78 -> 11.98 ms, bf16 18.31. Needs head_dim a power
# of two (whole rows, no D mask) and rows on 16-bit words (decode_dots); elsewhere the
# same fp16 dots over tiles loaded whole.
FP8_WIDEN_PAIRS = True
# The same for int8 tiles: each word's two bytes become fp16 by a byte permute into
# 1024 + 128 + x and one fp16x2 subtraction (exact for every int8). On an H100 (session
# 15): bytes 0.254 ms, pairs 0.213, halves 0.185; Qwen3-0.6B offline with int8 24,313 ->
# 28,708 -> 30,934 tok/s.
INT8_WIDEN_PAIRS = True
# The CPU interpreter cannot run the inline PTX: there the halves widen through bit
# operations (the same values), so the interpreted tests still cover their dots.
_INTERPRETED = tl.constexpr(INTERPRET)


def f16_dots(quant: int, q_dtype: torch.dtype, words: bool = False) -> int:
    """How a launch over a cache of QUANT code `quant` runs its dots: 0 in the query's
    dtype, 1 in fp16, 2 in fp16 over even and odd halves of tiles widened from 16-bit
    words (FP8_WIDEN_PAIRS, INT8_WIDEN_PAIRS), where `words` says the launch can (the
    decode kernel, head_dim a power of two, rows on words)."""
    if quant == 0 or q_dtype not in (torch.bfloat16, torch.float16):
        return 0
    if words and (FP8_WIDEN_PAIRS if quant == 1 else INT8_WIDEN_PAIRS):
        return 2
    return 1 if FP8_F16_DOTS and quant == 1 else 0


@triton.jit
def widen_halves_f16(Cache, row_off, mask_n, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] tile of 1-byte values as two [BLOCK_N, BLOCK_D // 2] fp16
    halves, the even head dimensions and the odd: loaded as 16-bit words (low byte even,
    high byte odd) and widened exactly, four values per call (two words in one 32-bit
    register: a byte permute puts the two low bytes side by side and the two high
    bytes): fp8 e4m3 by cvt.rn.f16x2.e4m3x2; int8 by placing each byte, sign bit
    flipped, under fp16 1024's exponent (1024 + 128 + x) and subtracting 1152 from both
    halves."""
    words = Cache.to(tl.pointer_type(tl.int16), bitcast=True)
    offs_w = tl.arange(0, BLOCK_D // 2)
    w = tl.load(words + (row_off // 2)[:, None] + offs_w[None, :], mask=mask_n[:, None], other=0)
    if _INTERPRETED:
        lo8 = (w & 0xFF).to(tl.uint8)
        hi8 = ((w >> 8) & 0xFF).to(tl.uint8)
        ty = tl.float8e4nv if QUANT == 1 else tl.int8
        lo = lo8.to(ty, bitcast=True).to(tl.float16)
        hi = hi8.to(ty, bitcast=True).to(tl.float16)
    elif QUANT == 1:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; .reg .b16 l, h; prmt.b32 t, $2, 0, 0x3120; mov.b32 {l, h}, t;"
            " cvt.rn.f16x2.e4m3x2 $0, l; cvt.rn.f16x2.e4m3x2 $1, h; }",
            "=r,=r,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=2,
        )  # fmt: skip
    else:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t, c; xor.b32 t, $2, 0x80808080; mov.b32 c, 0x64806480;"
            " prmt.b32 $0, t, 0x64646464, 0x4240; sub.f16x2 $0, $0, c;"
            " prmt.b32 $1, t, 0x64646464, 0x4341; sub.f16x2 $1, $1, c; }",
            "=r,=r,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=2,
        )  # fmt: skip
    return lo, hi


@triton.jit
def scaled_probs(p, vs, V_MUL: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The probabilities times each value row's scale (and V_MUL: values then come V_MUL
    times too large, kv_quant.V_MUL), in the PV dot's dtype. In fp16 (fp16 dots, or an
    fp16 model) a value row past fp16's range saturates, as the query does
    (widen_query_f16), instead of turning the output into inf/NaN."""
    pv = p * (vs * V_MUL)[None, :]
    if DOT_DTYPE == tl.float16:
        pv = tl.minimum(pv, 65504.0)
    return pv.to(DOT_DTYPE)


@triton.jit
def attend_cache_halves(
    q, K_cache, V_cache, K_scale, V_scale, table, lo, cache_hi, kvh, m_i, l_i,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh, sm_scale_log2,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    QUANT: tl.constexpr, V_MUL: tl.constexpr,
):  # fmt: skip
    """The decode loop over cached tokens [lo, cache_hi) for tiles widened from words
    (F16_DOTS == 2): the fp16 query split into even and odd head dimensions, each K/V
    tile widened into its two halves (widen_halves_f16), scores as the sum of the
    halves' dots, the output accumulated per half and interleaved back once at the end.
    Returns (m, l, acc) as the other loop leaves them."""
    qe, qo = tl.split(tl.reshape(q, (BLOCK_H, BLOCK_D // 2, 2)))
    acc_e = tl.zeros([BLOCK_H, BLOCK_D // 2], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_H, BLOCK_D // 2], dtype=tl.float32)
    for n0 in range(lo, cache_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < cache_hi
        blk = tl.load(table + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        within = offs_n % PAGE_SIZE
        k_lo, k_hi = widen_halves_f16(
            K_cache, blk * stride_kcb + within * stride_kct + kvh * stride_kch, mask_n, BLOCK_N, BLOCK_D, QUANT
        )
        ks = tl.load(K_scale + blk * stride_ksb + within * stride_kst + kvh * stride_ksh, mask=mask_n, other=0.0)
        s = tl.dot(qo, tl.trans(k_hi), tl.dot(qe, tl.trans(k_lo)))
        s = tl.where(mask_n[None, :], s * (ks * sm_scale_log2)[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_lo, v_hi = widen_halves_f16(
            V_cache, blk * stride_vcb + within * stride_vct + kvh * stride_vch, mask_n, BLOCK_N, BLOCK_D, QUANT
        )
        vs = tl.load(V_scale + blk * stride_vsb + within * stride_vst + kvh * stride_vsh, mask=mask_n, other=0.0)
        pv = scaled_probs(p, vs, V_MUL, tl.float16)
        acc_e = tl.dot(pv, v_lo, acc_e * alpha[:, None])
        acc_o = tl.dot(pv, v_hi, acc_o * alpha[:, None])
        m_i = m_new
    acc = tl.reshape(tl.join(acc_e, acc_o), (BLOCK_H, BLOCK_D))
    return m_i, l_i, acc


def decode_config(head_dim: int, dtype: torch.dtype = torch.bfloat16, quant: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the stage-1 launch: 64-token tiles (16 KB of K
    per tile at D=128 bf16) two deep keep ~64 KB of loads in flight per program. Each
    compiles for sm_90a without register spills (tests/gpu/test_compile_sm90.py)."""
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    if quant and dtype != torch.float32 and 64 < next_power_of_2(head_dim) <= 128:
        # A quantized cache: 128-token tiles at 4 warps (one-byte K/V: 16 KB per tile at
        # D=128, as bf16's 64). The engine's decode step at 16 x 16k on an H100: 14.38 ms
        # for fp8 against 18.39 at (64, 8, 2), and bf16's 16.91 (docs/kv_quantization.md).
        return 128, 4, 2
    if next_power_of_2(head_dim) <= 128:
        return 64, 4, 2
    return (16, 4, 2) if dtype == torch.float32 else (32, 4, 2)


def decode_num_splits(batch: int, num_kv_heads: int, group: int, max_seq_len: int, num_sms: int = 132) -> int:
    """Partitions per sequence: at least ~4 programs per SM (several resident per SM, so
    the last wave's tail stays short), none shorter than MIN_TOKENS_PER_SPLIT. This is the
    one launch parameter a CUDA graph must fix: capture with the bucket's largest
    max_seq_len (extra partitions of shorter sequences exit at once and merge as empty)."""
    programs = batch * num_kv_heads * cdiv(group, _block_h(group))
    want = cdiv(WAVE_PROGRAMS_PER_SM * num_sms, max(programs, 1))
    by_len = cdiv(max(max_seq_len, 1), MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, by_len, MAX_SPLITS))


def _block_h(group: int) -> int:
    # tl.dot needs >= 16 rows; the padded rows cost tensor-core time only, which decode has spare.
    return min(max(16, next_power_of_2(group)), 64)


@triton.jit
def widen_query_f16(q):
    """The query as fp16 for dots with fp8 tiles (FP8_F16_DOTS), clamped to fp16's range."""
    return tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)


@triton.jit
def tile_scores(
    q, K_cache, K_scale, blk, within, kvh, offs_d, kv_mask, mask_n,
    stride_kcb, stride_kct, stride_kch, stride_ksb, stride_kst, stride_ksh, sm_scale_log2,
    PRECISION: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    """Scores (log2 domain) of the query tile against one paged K tile; a quantized
    tile is widened to the query's dtype and its per-token scale folded into the
    scores' columns. Shared by the decode and verify kernels."""
    row = blk * stride_kcb + within * stride_kct + kvh * stride_kch
    k = tl.load(K_cache + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    if QUANT != 0:
        ks = tl.load(
            K_scale + blk * stride_ksb + within * stride_kst + kvh * stride_ksh, mask=mask_n, other=0.0
        )
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * (ks * sm_scale_log2)[None, :]
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
    return s


@triton.jit
def tile_values(
    acc, alpha, p, q, V_cache, V_scale, blk, within, kvh, offs_d, kv_mask, mask_n,
    stride_vcb, stride_vct, stride_vch, stride_vsb, stride_vst, stride_vsh,
    PRECISION: tl.constexpr, QUANT: tl.constexpr, V_MUL: tl.constexpr,
):  # fmt: skip
    """acc * alpha + p @ V for one paged V tile (the rescaled accumulator goes into the
    dot, as one expression: the compiled code is the same as written inline); a quantized
    tile's per-token scale is folded into the probabilities' columns (values then come
    V_MUL times too large: kv_quant.V_MUL)."""
    row = blk * stride_vcb + within * stride_vct + kvh * stride_vch
    v = tl.load(V_cache + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    if QUANT != 0:
        vs = tl.load(
            V_scale + blk * stride_vsb + within * stride_vst + kvh * stride_vsh, mask=mask_n, other=0.0
        )
        pv = scaled_probs(p, vs, V_MUL, q.dtype)
        acc = acc * alpha[:, None] + tl.dot(pv, v.to(q.dtype), input_precision=PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(V_cache.dtype.element_ty), v, input_precision=PRECISION)
    return acc


# Step-varying ints (block-table width, split count and the strides it sets) are not
# specialised on, so eager decode steps never recompile (graphs fix them anyway).
@triton.jit(do_not_specialize=["window", "stride_bt", "stride_mb", "stride_mh", "stride_lb", "stride_lh", "num_splits"])
def _decode_stage1_kernel(
    Q,
    K_new,
    V_new,
    K_cache,
    V_cache,
    Block_tables,
    Seq_lens,
    Slot_mapping,
    K_scale,
    V_scale,
    Out,
    Mid_o,
    Mid_lse,
    Order,
    sm_scale_log2,
    window,
    stride_qt,
    stride_qh,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
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
    HEAD_BLOCKS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SINGLE: tl.constexpr,
    SLIDING: tl.constexpr,
    FUSE_NEW: tl.constexpr,
    PRECISION: tl.constexpr,
    QUANT: tl.constexpr,
    V_MUL: tl.constexpr,
    F16_DOTS: tl.constexpr,
    ORDERED: tl.constexpr,
):
    if ORDERED:
        # Grid (heads, batch, splits): the hardware starts programs in grid order, so
        # sequence Order[i] (longest first) starts before Order[i + 1] with all its heads.
        hb = tl.program_id(0)
        b = tl.load(Order + tl.program_id(1))
    else:
        b = tl.program_id(0)
        hb = tl.program_id(1)
    split = tl.program_id(2)
    kvh = hb // HEAD_BLOCKS
    sub = hb % HEAD_BLOCKS
    offs_g = sub * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    cache_ty = K_cache.dtype.element_ty

    seq_len = tl.load(Seq_lens + b)
    start = 0
    if SLIDING:
        start = tl.maximum(seq_len - window, 0)
    # Partitions are whole tiles so only the last tile of a partition is ragged.
    chunk = tl.cdiv(tl.cdiv(seq_len - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    cache_hi = hi
    if FUSE_NEW:
        # The newest position is not in the cache yet: it comes from the k/v inputs below.
        cache_hi = tl.minimum(hi, seq_len - 1)

    q = tl.load(
        Q + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )
    if QUANT == 0:
        q = q.to(cache_ty)
    elif F16_DOTS:
        q = widen_query_f16(q)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table = Block_tables + b.to(tl.int64) * stride_bt
    if F16_DOTS == 2:
        m_i, l_i, acc = attend_cache_halves(
            q, K_cache, V_cache, K_scale, V_scale, table, lo, cache_hi, kvh, m_i, l_i,
            stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
            stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh, sm_scale_log2,
            BLOCK_H, BLOCK_N, BLOCK_D, PAGE_SIZE, QUANT, V_MUL,
        )  # fmt: skip
    else:
        for n0 in range(lo, cache_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < cache_hi
            blk = tl.load(table + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
            within = offs_n % PAGE_SIZE
            kv_mask = mask_n[:, None] & mask_d[None, :]
            s = tile_scores(
                q, K_cache, K_scale, blk, within, kvh, offs_d, kv_mask, mask_n,
                stride_kcb, stride_kct, stride_kch, stride_ksb, stride_kst, stride_ksh, sm_scale_log2, PRECISION, QUANT,
            )  # fmt: skip
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tile_values(
                acc, alpha, p, q, V_cache, V_scale, blk, within, kvh, offs_d, kv_mask, mask_n,
                stride_vcb, stride_vct, stride_vch, stride_vsb, stride_vst, stride_vsh, PRECISION, QUANT, V_MUL,
            )  # fmt: skip
            m_i = m_new

    if FUSE_NEW:
        if lo < hi:
            if hi == seq_len:
                # Round through the cache dtype so the result equals reading it back.
                kn = tl.load(
                    K_new + b.to(tl.int64) * stride_knt + kvh * stride_knh + offs_d, mask=mask_d, other=0.0
                )
                vn = tl.load(
                    V_new + b.to(tl.int64) * stride_vnt + kvh * stride_vnh + offs_d, mask=mask_d, other=0.0
                )
                slot = tl.load(Slot_mapping + b).to(tl.int64)
                if QUANT != 0:
                    # Quantized as the cache will hold it ([1, D] rows for the helper), and
                    # stored at once: fewer values live across the update (no spills).
                    kq, kn_scale = quantize_rows(kn.to(tl.float32)[None, :], QUANT)
                    vq, vn_scale = quantize_rows(vn.to(tl.float32)[None, :], QUANT)
                    if sub == 0:
                        if slot >= 0:
                            one = tl.arange(0, 1)
                            blk_w = slot // PAGE_SIZE
                            off_w = slot % PAGE_SIZE
                            base_k = K_cache + blk_w * stride_kcb + off_w * stride_kct + kvh * stride_kch
                            base_v = V_cache + blk_w * stride_vcb + off_w * stride_vct + kvh * stride_vch
                            tl.store(base_k + one[:, None] * 0 + offs_d[None, :], kq, mask=mask_d[None, :])
                            tl.store(base_v + one[:, None] * 0 + offs_d[None, :], vq, mask=mask_d[None, :])
                            tl.store(
                                K_scale + blk_w * stride_ksb + off_w * stride_kst + kvh * stride_ksh + one,
                                kn_scale,
                            )
                            tl.store(
                                V_scale + blk_w * stride_vsb + off_w * stride_vst + kvh * stride_vsh + one,
                                vn_scale,
                            )
                    kn32 = tl.sum(kq.to(tl.float32) * kn_scale[:, None], 0)
                    vn32 = tl.sum(vq.to(tl.float32) * (vn_scale * V_MUL)[:, None], 0)
                else:
                    kn = kn.to(cache_ty)
                    vn = vn.to(cache_ty)
                    kn32 = kn.to(tl.float32)
                    vn32 = vn.to(tl.float32)
                s_new = tl.sum(q.to(tl.float32) * kn32[None, :], 1) * sm_scale_log2
                m_new = tl.maximum(m_i, s_new)
                alpha = tl.exp2(m_i - m_new)
                p_new = tl.exp2(s_new - m_new)
                l_i = l_i * alpha + p_new
                acc = acc * alpha[:, None] + p_new[:, None] * vn32[None, :]
                m_i = m_new
                # One program per KV head stores it; slot < 0 marks a padded (graph) row.
                if QUANT == 0:
                    if sub == 0:
                        if slot >= 0:
                            blk_w = slot // PAGE_SIZE
                            off_w = slot % PAGE_SIZE
                            tl.store(
                                K_cache + blk_w * stride_kcb + off_w * stride_kct + kvh * stride_kch + offs_d,
                                kn,
                                mask=mask_d,
                            )
                            tl.store(
                                V_cache + blk_w * stride_vcb + off_w * stride_vct + kvh * stride_vch + offs_d,
                                vn,
                                mask=mask_d,
                            )

    # Empty partitions (and padded rows with seq_len 0) leave l == 0: zeros, lse -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    if QUANT != 0:
        o = acc / (l_safe * V_MUL)[:, None]  # values accumulated V_MUL times too large (kv_quant.V_MUL)
    else:
        o = acc / l_safe[:, None]
    out_mask = mask_h[:, None] & mask_d[None, :]
    if SINGLE:
        tl.store(
            Out + b.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(Out.dtype.element_ty),
            mask=out_mask,
        )
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(Mid_lse + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=mask_h)
        # An empty partition writes only its -inf lse and the merge skips its row: with a
        # split count fixed for the longest context (CUDA graphs) most partitions of a short
        # sequence are empty, and this keeps them to one small store each.
        if lo < hi:
            base = b.to(tl.int64) * stride_mb + heads * stride_mh + split * stride_ms
            tl.store(Mid_o + base[:, None] + offs_d[None, :], o, mask=out_mask)


@triton.jit(do_not_specialize=["stride_mb", "stride_mh", "stride_lb", "stride_lh", "num_splits"])
def _decode_reduce_kernel(
    Mid_o,
    Mid_lse,
    Out,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ot,
    stride_oh,
    num_splits,
    SPLITS_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    mask_s = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(
        Mid_lse + b.to(tl.int64) * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf")
    )
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    # Empty partitions (lse -inf) never wrote their rows: don't read them.
    filled = mask_s & (lse > float("-inf"))
    o = tl.load(
        Mid_o + b.to(tl.int64) * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
        mask=filled[:, None] & mask_d[None, :],
        other=0.0,
    )
    total = tl.sum(w, 0)
    total = tl.where(total > 0, total, 1.0)
    res = tl.sum(w[:, None] * o, 0) / total
    tl.store(
        Out + b.to(tl.int64) * stride_ot + h * stride_oh + offs_d, res.to(Out.dtype.element_ty), mask=mask_d
    )


def split_buffers(out: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's per-partition outputs and log-sum-exps for `out` [rows, heads, D]; with
    one partition stage 1 writes `out` itself and these are unused placeholders."""
    if num_splits == 1:
        return out, out
    rows, num_heads, head_dim = out.shape
    mid_o = torch.empty(rows, num_heads, num_splits, head_dim, dtype=torch.float32, device=out.device)
    mid_lse = torch.empty(rows, num_heads, num_splits, dtype=torch.float32, device=out.device)
    return mid_o, mid_lse


def merge_splits(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor, num_splits: int) -> None:
    """Stage 2: merge each row's and head's partitions into `out` by their log-sum-exp."""
    rows, num_heads, head_dim = out.shape
    _decode_reduce_kernel[(rows, num_heads)](
        mid_o,
        mid_lse,
        out,
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out.stride(0),
        out.stride(1),
        num_splits,
        SPLITS_P2=next_power_of_2(num_splits),
        BLOCK_D=next_power_of_2(head_dim),
        HEAD_DIM=head_dim,
        num_warps=4,
    )


def decode_dots(quant: int, q_dtype: torch.dtype, k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """The decode kernel's F16_DOTS: tiles widen from 16-bit words where FP8_WIDEN_PAIRS
    (or INT8_WIDEN_PAIRS) is on, rows are whole (head_dim a power of two) and every row
    starts on a 16-bit word (even base addresses and strides: the kernel reads rows as
    words). The CPU interpreter cannot run inline PTX; there the halves widen through
    bit operations (the same values: e4m3 and int8 widen to fp16 exactly)."""
    head_dim = k_cache.shape[-1]
    on_words = all(x % 2 == 0 for t in (k_cache, v_cache) for x in (t.data_ptr(), *t.stride()[:3]))
    return f16_dots(quant, q_dtype, words=next_power_of_2(head_dim) == head_dim and on_words)


def paged_decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_mapping: torch.Tensor | None,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `paged_decode_attention_ref` (same arguments and result).

    `order` (int32 [batch], a permutation of the rows, e.g. longest context first) is the
    order the rows' programs start in; it changes when work starts, not the result.
    No host synchronisation: sizes come from tensor shapes and the host ints passed in.
    """
    batch, num_heads, head_dim = q.shape
    num_blocks, page_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    for t in (q, k_cache, v_cache, out) + ((k, v) if k is not None else ()):
        assert t is not None and t.stride(-1) == 1, "head_dim must be contiguous"
    fuse = k is not None
    if fuse:
        assert v is not None and slot_mapping is not None
    else:
        k = v = q  # unused placeholders (FUSE_NEW=False); keeps the signature typed
        slot_mapping = seq_lens
    quant, k_scale, v_scale = kernel_scales(k_cache, k_scale, v_scale, seq_lens)
    block_h = _block_h(group)
    head_blocks = cdiv(group, block_h)
    if num_splits is None:
        longest = max_seq_len if max_seq_len is not None else block_tables.shape[1] * page_size
        num_splits = decode_num_splits(batch, num_kv_heads, group, longest, device_sms(q))
    block_d = next_power_of_2(head_dim)
    block_n, num_warps, num_stages = decode_config(head_dim, q.dtype if quant else k_cache.dtype, bool(quant))
    mid_o, mid_lse = split_buffers(out, num_splits)
    grid = (batch, num_kv_heads * head_blocks, num_splits) if order is None else (num_kv_heads * head_blocks, batch, num_splits)
    _decode_stage1_kernel[grid](
        q,
        k,
        v,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        slot_mapping,
        k_scale,
        v_scale,
        out,
        mid_o,
        mid_lse,
        order if order is not None else seq_lens,
        scale * math.log2(math.e),
        sliding_window or 0,
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
        mid_o.stride(0) if num_splits > 1 else 0,
        mid_o.stride(1) if num_splits > 1 else 0,
        mid_o.stride(2) if num_splits > 1 else 0,
        mid_lse.stride(0) if num_splits > 1 else 0,
        mid_lse.stride(1) if num_splits > 1 else 0,
        num_splits,
        GROUP=group,
        HEAD_BLOCKS=head_blocks,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        SINGLE=num_splits == 1,
        SLIDING=sliding_window is not None,
        FUSE_NEW=fuse,
        # Quantized tiles are widened to the query's dtype before the dots.
        PRECISION=dot_precision(q.dtype if quant else k_cache.dtype),
        QUANT=quant,
        V_MUL=V_MUL[quant],
        F16_DOTS=decode_dots(quant, q.dtype, k_cache, v_cache),
        ORDERED=order is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        merge_splits(mid_o, mid_lse, out, num_splits)
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_mapping: torch.Tensor | None,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention in plain torch (loops on the host).

    q: [B, Hq, D], one query per sequence at position seq_len - 1. When k/v [B, Hkv, D] are
    given they are first stored at `slot_mapping` [B] (slots < 0 are skipped); otherwise the
    cache must already hold every position. Returns out [B, Hq, D]. `num_splits` and
    `max_seq_len` only steer the Triton launch. A quantized cache (fp8/int8) comes with
    `k_scale`/`v_scale` [num_blocks, block_size, Hkv]; attention runs on its dequantized
    contents (the new token through the store's quantization as well).
    """
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k is not None and v is not None and slot_mapping is not None:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            out[i] = 0
            continue
        out[i] = reference_attention(
            q[i : i + 1],
            gather_context(k_cache, block_tables[i], seq_len, k_scale),
            gather_context(v_cache, block_tables[i], seq_len, v_scale),
            scale,
            sliding_window,
        )[0]
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_mapping: torch.Tensor | None,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA, the torch reference elsewhere."""
    fn = paged_decode_attention_triton if use_triton(q) else paged_decode_attention_ref
    return fn(
        q,
        k,
        v,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        slot_mapping,
        scale,
        sliding_window,
        out,
        num_splits,
        max_seq_len,
        k_scale,
        v_scale,
    )
