"""Attention backend built on the Triton kernels in `rtpllm.kernels`.

A step's sequences come decodes first: they go to the split-KV decode kernel, the rest
(prefill and chunked-prefill/extend chunks) to the extend kernel, each in one launch, with
the KV-cache write fused into both. Exceptions, settled by measurement on the GPU
(bench/attention.py's prefill rows; docs/kernels.md): a single long prompt with no cached
prefix goes to PyTorch's SDPA when `prefill_impl` allows it; on a quantized cache, a
single chunk of at least QUANT_CHUNK_SDPA_MIN_TOKENS over a cached prefix goes to SDPA
over the context read back.

forward() never synchronises with the host: every size it needs comes from tensor shapes
or the host copies in the metadata, so a decode step can be captured in a CUDA graph. For
capture, `graph_capture(batch, max_seq_len)` pins the decode grid's only free dimension,
the split-KV count, to `decode_num_splits(batch, num_kv_heads, group, max_seq_len)`
(or set `decode_num_splits` explicitly); everything else the decode launch depends on is
the batch size (the graph's bucket) and device tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from rtpllm.attention.backend import AttentionBackend, AttentionMetadata, register_backend
from rtpllm.kernels._triton import HAS_TRITON
from rtpllm.kernels.decode_attention import paged_decode_attention_triton
from rtpllm.kernels.extend_attention import paged_extend_attention_triton
from rtpllm.kernels.kv_cache import store_kv_triton
from rtpllm.kernels.kv_quant import dequantize_ref
from rtpllm.kernels.verify_attention import paged_verify_attention_triton, verify_fits

# A lone prompt without cached prefix at least this long is handed to SDPA (flash) in
# "auto" mode. Set from bench/attention.py's prefill rows on the H100 (docs/kernels.md).
SDPA_PREFILL_MIN_TOKENS = 1024
# Verify steps whose metadata groups each sequence's rows read its KV once per group
# (the verify kernel); False: once per row (the decode kernel), for A/B runs
# (bench/speculative.py --methods METHOD@rows).
GROUPED_VERIFY = True
# A quantized cache's prefill chunk over a cached prefix (chunked prefill of a long
# prompt, a prefix hit) goes to SDPA over the whole context read back and dequantized,
# instead of the quantized extend kernel, from this many new tokens (None: never). On an
# H100 the path took 0.33 ms against the fp8 extend kernel's 0.58 ms for 512 tokens over
# 4,096, and 3.3 against 13.7 ms for 4,096 over 12,288 (bench/attention.py --quant-chunk,
# docs/kv_quantization.md); shorter chunks were not measured and stay on the kernel.
# Uncached prompts are not chunks: on any cache they go to SDPA from
# SDPA_PREFILL_MIN_TOKENS. Sending quantized-cache prompts of 512-1023 tokens there too
# cost the 0.6B offline run (256 prompts of 100-1,024 tokens) 16% of its throughput on
# an H100: each such prompt paid ~0.6 ms of host work per layer (cuDNN's dispatch 0.11
# ms, the pads, the read-back's gathers; bench/engine.py profile-admission: 32 prompts
# in 372 ms against 61 with bf16, kernels 98 against 50 ms; docs/benchmarks.md).
QUANT_CHUNK_SDPA_MIN_TOKENS: int | None = 512
# A quantized cache's decode rows: True stores their K/V (quantized) with the store
# kernel first and attends from the cache alone, instead of the decode kernel quantizing
# and storing the new token itself. In the engine the fused quantized decode kernel ran
# 17% slower than the bf16 one per layer on an H100 (docs/kv_quantization.md); whether
# the lighter kernel pays for the extra launch is for a GPU run to say
# (bench/kv_quant.py profile --quant-store-first). Off until then.
QUANT_DECODE_STORE_FIRST = False
# A quantized cache's prefill chunks through the extend kernel: True stores their K/V
# (quantized) with the store kernel first, and the kernel reads the new tokens back from
# the cache like the prefix, instead of every query-head program quantizing every new
# tile in registers again (GROUP x the diagonal's tiles per tile, and 64-row launches to
# leave it registers). The same values either way (one quantizer). On the H100 an fp8
# prefill step of ~7,800 new tokens took 37-43 ms against bf16's 24. Timed on an H100
# (session 15, docs/benchmarks.md): a prefill step's attention 0.347 -> 0.325 ms (fp8) and
# 0.397 -> 0.300 ms (int8) over 7,138 prompt tokens, 0.424 -> 0.291 ms (fp8) for chunks over
# prefixes; Qwen3-0.6B offline with fp8 28,806 -> 29,666 tok/s.
QUANT_EXTEND_STORE_FIRST = True
# A prompt's causal SDPA call runs over its length rounded up to one of this many sizes
# per octave (CUDA only). cuDNN's attention (SDPA's first choice on Hopper) builds an
# execution graph per shape, ~37 ms on an H100, and caches it by shape: at every new
# prompt length a step stalled that long (bench/attention.py --new-shapes; a length in
# a bucket already built costs a steady call; docs/kernels.md).
# Rows past the prompt come after every real row, so the causal mask keeps them out of
# the real rows' attention; their outputs are dropped. None: exact lengths.
SDPA_LEN_BUCKETS_PER_OCTAVE: int | None = 4


class TritonAttentionBackend(AttentionBackend):
    """Paged attention through the Triton decode and extend kernels.

    prefill_impl: "auto" (SDPA for one long uncached prompt, Triton otherwise), "triton"
    (always the extend kernel) or "sdpa" (SDPA whenever the step's prefill part is a
    single uncached prompt without a sliding window).
    decode_num_splits: fixed split-KV partition count for the decode kernel (required to
    be fixed under CUDA-graph capture); None picks one per step from the batch shape.
    """

    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, prefill_impl: str = "auto", decode_num_splits: int | None = None) -> None:
        if prefill_impl not in ("auto", "triton", "sdpa"):
            raise ValueError(f"prefill_impl must be auto, triton or sdpa, got {prefill_impl!r}")
        self.prefill_impl = prefill_impl
        self.decode_num_splits = decode_num_splits
        # Set while a decode step is being captured: the context bound the split count
        # is derived from, whatever the step's own max_seq_len says.
        self._capture_max_seq_len: int | None = None

    @contextmanager
    def graph_capture(self, batch_size: int, max_seq_len: int) -> Iterator[None]:
        """Fix the decode launch for capture: its only shape-dependent parameter is the
        split-KV count, derived from `batch_size` (the grid's batch) and `max_seq_len`."""
        saved = self._capture_max_seq_len
        self._capture_max_seq_len = max_seq_len
        try:
            yield
        finally:
            self._capture_max_seq_len = saved

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
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd = meta.num_decodes
        if nd > 0:
            # The decode kernel stores each row's new K/V itself and attends to it from
            # registers; rows of one sequence need each other's K/V in the cache first.
            fused = not meta.decode_rows_share_seqs and not (k_scale is not None and QUANT_DECODE_STORE_FIRST)
            if not fused:
                store_kv_triton(k[:nd], v[:nd], k_cache, v_cache, meta.slot_mapping[:nd], k_scale, v_scale)
            if not fused and self._grouped(q, k, meta):
                assert meta.decode_spans is not None
                paged_verify_attention_triton(
                    q[:nd],
                    k_cache,
                    v_cache,
                    meta.block_tables[:nd],
                    meta.seq_lens[:nd],
                    meta.decode_spans[:nd],
                    scale,
                    meta.max_decode_span,
                    sliding_window,
                    out=out[:nd],
                    num_splits=self.decode_num_splits,
                    max_seq_len=self._capture_max_seq_len or meta.max_seq_len,
                    num_groups=meta.num_decode_groups or None,
                    k_scale=k_scale,
                    v_scale=v_scale,
                )
            else:
                paged_decode_attention_triton(
                    q[:nd],
                    k[:nd] if fused else None,
                    v[:nd] if fused else None,
                    k_cache,
                    v_cache,
                    meta.block_tables[:nd],
                    meta.seq_lens[:nd],
                    meta.slot_mapping[:nd],
                    scale,
                    sliding_window,
                    out=out[:nd],
                    num_splits=self.decode_num_splits,
                    max_seq_len=self._capture_max_seq_len or meta.max_seq_len,
                    k_scale=k_scale,
                    v_scale=v_scale,
                    order=meta.decode_order,
                )
        if meta.num_seqs > nd:
            quantized = k_scale is not None
            # The sequences between two that SDPA takes go to the extend kernel in one launch.
            run_start = nd
            for i in range(nd, meta.num_seqs):
                if self._takes_sdpa(meta, i, sliding_window, quantized):
                    if i > run_start:
                        self._forward_extend(q, k, v, k_cache, v_cache, meta, scale, out, sliding_window, run_start, i, k_scale, v_scale)
                    self._forward_sdpa(q, k, v, k_cache, v_cache, meta, i, scale, out, k_scale, v_scale)
                    run_start = i + 1
            if meta.num_seqs > run_start:
                self._forward_extend(q, k, v, k_cache, v_cache, meta, scale, out, sliding_window, run_start, meta.num_seqs, k_scale, v_scale)
        return out

    @staticmethod
    def _grouped(q: torch.Tensor, k: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether a verify step's rows go to the verify kernel, grouped by sequence."""
        return (
            GROUPED_VERIFY
            and meta.decode_spans is not None
            and verify_fits(q.shape[1], k.shape[1], meta.max_decode_span)
        )

    def _takes_sdpa(self, meta: AttentionMetadata, i: int, sliding_window: int | None, quantized: bool) -> bool:
        """Whether prefill sequence `i` goes to SDPA (host values only): a prompt with
        nothing cached from SDPA_PREFILL_MIN_TOKENS new tokens (any length with
        prefill_impl "sdpa"), whatever the cache; on a quantized cache also a chunk over
        a cached prefix, from QUANT_CHUNK_SDPA_MIN_TOKENS new tokens (any with "sdpa"),
        whose context is read back. Each sequence is judged alone: a step holding several
        long prompts sends each of them to SDPA, where the quantized extend kernel is
        2-4x slower."""
        if self.prefill_impl == "triton" or sliding_window is not None:
            return False
        q_len = meta.query_start_loc_host[i + 1] - meta.query_start_loc_host[i]
        uncached = meta.seq_lens_host[i] == q_len
        if self.prefill_impl == "sdpa":
            return uncached or quantized
        if uncached:
            return q_len >= SDPA_PREFILL_MIN_TOKENS
        return quantized and QUANT_CHUNK_SDPA_MIN_TOKENS is not None and q_len >= QUANT_CHUNK_SDPA_MIN_TOKENS

    @staticmethod
    def _forward_extend(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
        sliding_window: int | None,
        first: int,
        end: int,
        k_scale: torch.Tensor | None,
        v_scale: torch.Tensor | None,
    ) -> None:
        """Sequences first..end-1 (prefill chunks) through the extend kernel, one launch."""
        qsl = meta.query_start_loc_host
        max_query_len = max(qsl[i + 1] - qsl[i] for i in range(first, end))
        from_cache = k_scale is not None and QUANT_EXTEND_STORE_FIRST
        if from_cache:
            rows = slice(qsl[first], qsl[end])
            store_kv_triton(k[rows], v[rows], k_cache, v_cache, meta.slot_mapping[rows], k_scale, v_scale)
        paged_extend_attention_triton(
            q,
            k,
            v,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens[:end],
            None if from_cache else meta.slot_mapping,
            scale,
            sliding_window,
            max_query_len,
            seq_base=first,
            out=out,
            k_scale=k_scale,
            v_scale=v_scale,
            new_from_cache=from_cache,
        )

    @staticmethod
    def _forward_sdpa(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        i: int,
        scale: float,
        out: torch.Tensor,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> None:
        """Prefill sequence `i` through SDPA: a prompt with nothing cached, or, on a
        quantized cache, a chunk over its cached prefix (`_takes_sdpa`)."""
        start, end = meta.query_start_loc_host[i], meta.query_start_loc_host[i + 1]
        seq_len = meta.seq_lens_host[i]
        slots = meta.slot_mapping[start:end]
        k, v = k[start:end], v[start:end]
        store_kv_triton(k, v, k_cache, v_cache, slots, k_scale, v_scale)
        if k_scale is not None and v_scale is not None:
            # A quantized cache: attend to what it now holds (the rows read back and
            # dequantized), not to the unrounded K/V, so the prompt's decode steps and a
            # later prefix hit on it see the keys its prefill saw; with a cached prefix,
            # the whole context is read back.
            block_size = k_cache.shape[1]
            if seq_len > end - start:
                pos = torch.arange(seq_len, device=q.device)
                blocks, offsets = meta.block_tables[i][pos // block_size].long(), pos % block_size
            else:
                blocks, offsets = slots // block_size, slots % block_size
            k = _read_back(k_cache, k_scale, blocks, offsets, q.dtype)
            v = _read_back(v_cache, v_scale, blocks, offsets, q.dtype)
        # [L, H, D] -> [1, H, L, D] views; enable_gqa keeps the flash kernel on GQA shapes.
        qt = q[start:end].transpose(0, 1).unsqueeze(0)
        kt = k.transpose(0, 1).unsqueeze(0)
        vt = v.transpose(0, 1).unsqueeze(0)
        if seq_len == end - start:
            res = causal_sdpa(qt, kt, vt, scale, SDPA_LEN_BUCKETS_PER_OCTAVE if q.is_cuda else None)
        else:  # the chunk's row i sees the prefix and the chunk up to itself
            # Imported here: torch.nn.attention.bias imports torch._dynamo and sympy,
            # seconds of every engine start (tests/unit/test_build_model.py).
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(end - start, seq_len)
            res = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = res[0].transpose(0, 1)


def bucketed_len(n: int, per_octave: int) -> int:
    """`n` rounded up to one of `per_octave` evenly spaced sizes per power of two (at
    least 64-aligned): at most 1/per_octave more rows, and few distinct shapes."""
    step = max(64, (1 << max(n - 1, 1).bit_length()) // (2 * per_octave))
    return -(-n // step) * step


def causal_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, per_octave: int | None
) -> torch.Tensor:
    """Causal SDPA over [1, H, L, D] views, with L padded at the end to `bucketed_len`
    (`per_octave` None: as is). The padded rows are zeros after every real row, so no
    real row sees them (causal); their outputs are cut off."""
    n = q.shape[2]
    padded = n if per_octave is None else bucketed_len(n, per_octave)
    if padded > n:
        q, k, v = (F.pad(t, (0, 0, 0, padded - n)) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)[:, :, :n]


def _read_back(
    cache: torch.Tensor, scales: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Rows [T, Hkv, D] of a quantized cache at (`blocks`, `offsets`), dequantized to
    `dtype` (the positions are split once for K and V, not per read)."""
    # Gathered as bytes: index of float8 dtypes is missing from some torch builds.
    values = cache.view(torch.uint8)[blocks, offsets].view(cache.dtype)
    return dequantize_ref(values, scales[blocks, offsets], dtype)


if HAS_TRITON and torch.cuda.is_available():
    register_backend("triton", TritonAttentionBackend)
