"""Quantized KV (fp8 / int8, one scale per token per KV head) through the Triton kernels.

The caches are the pool's real layout: byte pages [blocks, 2, block_size, Hkv, D + 4]
(values then scales per block page, rtpllm.kvcache.kv_format), so K/V values and scales
are strided views with block strides larger than a block. Each kernel is checked against
its torch reference:
- the quantized store: scales equal, values equal (at most one step off on a GPU, whose
  int8 rounding may contract into an FMA on exact ties);
- fused decode / extend attention: the cache afterwards equals the reference store's, and
  the output equals fp32 attention over the dequantized cache contents (the new tokens
  included: they are attended to as stored).
On a GPU at realistic shapes; on the CPU under TRITON_INTERPRET=1 at small ones.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from gpu_env import ON_GPU
from paged_cases import PagedCase, make_case, rel_err

from rtpllm.attention.torch_ref import TorchReferenceBackend
from rtpllm.attention.triton_backend import TritonAttentionBackend
from rtpllm.kernels.attention_ref import gather_context, reference_attention
from rtpllm.kernels.decode_attention import paged_decode_attention_triton
from rtpllm.kernels.extend_attention import paged_extend_attention_triton
from rtpllm.kernels.kv_cache import store_kv_ref, store_kv_triton
from rtpllm.kernels.kv_quant import dequantize_ref, quantize_ref
from rtpllm.kvcache.kv_format import quantized_views

pytestmark = pytest.mark.gpu

FORMATS = ["fp8", "int8"]
HEADS = [(8, 8), (32, 8), (32, 4), (16, 1)] if ON_GPU else [(2, 2), (4, 1), (8, 2)]
NUM_RANDOM = 24 if ON_GPU else 6
# Output vs fp32 attention on the dequantized cache: the kernels widen the 1-byte values
# exactly, so only the query dtype's rounding (and p * v_scale rounded for the dot) remain.
TOL = {torch.float32: 3e-5, torch.bfloat16: 1.5e-2, torch.float16: 4e-3}


class QuantCase:
    """A PagedCase whose caches are quantized pages of one byte pool."""

    def __init__(self, case: PagedCase, fmt: str) -> None:
        self.case, self.fmt = case, fmt
        blocks, bs, heads, dim = case.k_cache.shape
        self.pool = torch.zeros(blocks, 2, bs, heads, dim + 4, dtype=torch.uint8, device=case.q.device)
        self.k_cache, self.k_scale = quantized_views(self.pool[:, 0], fmt, bs, heads, dim)
        self.v_cache, self.v_scale = quantized_views(self.pool[:, 1], fmt, bs, heads, dim)
        # The random plain caches become the cached prefix, quantized as the store would.
        for src, vals, scales in ((case.k_cache, self.k_cache, self.k_scale), (case.v_cache, self.v_cache, self.v_scale)):
            q, s = quantize_ref(src, fmt)
            vals.copy_(q)
            scales.copy_(s)

    def clone_pool(self) -> tuple[torch.Tensor, ...]:
        blocks, bs, heads, dim = self.case.k_cache.shape
        pool = self.pool.clone()
        k, ks = quantized_views(pool[:, 0], self.fmt, bs, heads, dim)
        v, vs = quantized_views(pool[:, 1], self.fmt, bs, heads, dim)
        return pool, k, v, ks, vs

    def reference_out(self, window: int | None) -> torch.Tensor:
        """fp32 attention of every query over the dequantized cache as it is now."""
        meta, q = self.case.meta, self.case.q.float()
        out = torch.empty_like(q)
        qsl = meta.query_start_loc_host
        for i, seq_len in enumerate(meta.seq_lens_host):
            start, end = qsl[i], qsl[i + 1]
            table = meta.block_tables[i]
            k_ctx = gather_context(self.k_cache, table, seq_len, self.k_scale)
            v_ctx = gather_context(self.v_cache, table, seq_len, self.v_scale)
            out[start:end] = reference_attention(q[start:end], k_ctx, v_ctx, self.case.scale, window)
        return out

    def check_cache_matches_reference_store(self) -> None:
        """The kernel's fused write left the pool as the reference store would."""
        meta = self.case.meta
        pool, k, v, ks, vs = self.expected
        store_kv_ref(self.case.k, self.case.v, k, v, meta.slot_mapping, ks, vs)
        _assert_quantized_equal(self.k_cache, self.k_scale, k, ks)
        _assert_quantized_equal(self.v_cache, self.v_scale, v, vs)

    def snapshot(self) -> None:
        self.expected = self.clone_pool()


def _assert_quantized_equal(vals: torch.Tensor, scales: torch.Tensor, exp_vals: torch.Tensor, exp_scales: torch.Tensor) -> None:
    torch.testing.assert_close(scales, exp_scales, rtol=1e-6, atol=0)
    got = dequantize_ref(vals, scales)
    want = dequantize_ref(exp_vals, exp_scales)
    step = exp_scales.unsqueeze(-1) * (1.0 if vals.dtype == torch.int8 else 32.0)  # int8 step; fp8 top-binade step
    assert ((got - want).abs() <= step * 1.0001).all(), "a value is more than one quantization step off"
    same = (vals.view(torch.uint8) == exp_vals.view(torch.uint8)).float().mean().item()
    assert same >= (0.999 if ON_GPU else 1.0), f"only {same:.4%} of the values are bit-equal"


def _random_case(seed: int, device: str, decode: bool) -> tuple[QuantCase, int | None]:
    rng = random.Random(seed)
    if ON_GPU:
        batch = rng.choice([1, 3, 16, 64])
        max_ctx = {1: 16500, 3: 9000, 16: 4500, 64: 2100}[batch]
        head_dim = rng.choice([64, 128, 128])
        dtype = rng.choice([torch.bfloat16, torch.float16])
    else:
        batch = rng.choice([1, 2, 3])
        max_ctx = 200
        head_dim = rng.choice([32, 64])
        dtype = rng.choice([torch.float32, torch.bfloat16])
    num_heads, num_kv_heads = rng.choice(HEADS)
    block_size = rng.choice([16, 32])
    seq_lens = [rng.randint(1, max_ctx) for _ in range(batch)]
    if decode:
        q_lens = [1] * batch
        seq_lens = [max(s, 2) for s in seq_lens]
    else:
        q_lens = [rng.randint(1, s) for s in seq_lens]
    window = rng.choice([None, None, rng.randint(1, max_ctx)])
    case = make_case(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed)
    return QuantCase(case, FORMATS[seed % 2]), window


def _run_decode(qc: QuantCase, window: int | None, num_splits: int | None) -> torch.Tensor:
    c, meta = qc.case, qc.case.meta
    out = torch.full_like(c.q, float("nan"))
    paged_decode_attention_triton(
        c.q, c.k, c.v, qc.k_cache, qc.v_cache, meta.block_tables, meta.seq_lens, meta.slot_mapping, c.scale,
        window, out=out, num_splits=num_splits, max_seq_len=meta.max_seq_len, k_scale=qc.k_scale, v_scale=qc.v_scale,
    )
    return out


def _run_extend(qc: QuantCase, window: int | None) -> torch.Tensor:
    c, meta = qc.case, qc.case.meta
    out = torch.full_like(c.q, float("nan"))
    paged_extend_attention_triton(
        c.q, c.k, c.v, qc.k_cache, qc.v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
        meta.slot_mapping, c.scale, window, meta.max_query_len, out=out, k_scale=qc.k_scale, v_scale=qc.v_scale,
    )
    return out


def _check(qc: QuantCase, out: torch.Tensor, window: int | None) -> None:
    assert not torch.isnan(out).any(), "unwritten (or NaN) output elements"
    qc.check_cache_matches_reference_store()
    err = rel_err(out, qc.reference_out(window))
    assert err < TOL[qc.case.q.dtype], f"rel err {err:.2e} ({qc.fmt}, {qc.case.q.dtype})"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_quantized(kernel_device: str, fmt: str, dtype: torch.dtype) -> None:
    case = make_case([40, 9, 70], [40, 9, 30], 4, 2, 64, 16, dtype, kernel_device, seed=5)
    qc = QuantCase(case, fmt)
    qc.snapshot()
    slots = case.meta.slot_mapping.clone()
    slots[3] = -1  # a padded token writes nothing
    store_kv_triton(case.k, case.v, qc.k_cache, qc.v_cache, slots, qc.k_scale, qc.v_scale)
    _, k, v, ks, vs = qc.expected
    store_kv_ref(case.k, case.v, k, v, slots, ks, vs)
    _assert_quantized_equal(qc.k_cache, qc.k_scale, k, ks)
    _assert_quantized_equal(qc.v_cache, qc.v_scale, v, vs)
    assert torch.equal(qc.pool, qc.expected[0]), "bytes outside the written slots changed"


@pytest.mark.parametrize("seed", range(NUM_RANDOM))
def test_decode_quantized_random(kernel_device: str, seed: int) -> None:
    qc, window = _random_case(seed, kernel_device, decode=True)
    qc.snapshot()
    rng = random.Random(seed)
    out = _run_decode(qc, window, rng.choice([None, 1, 3]))
    _check(qc, out, window)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("seq_lens", "window", "num_splits"), [([2, 17, 64, 65], None, None), ([100, 130], 37, 3)])
def test_decode_quantized_edges(
    kernel_device: str, fmt: str, seq_lens: list[int], window: int | None, num_splits: int | None
) -> None:
    for dtype in (torch.bfloat16, torch.float32):
        case = make_case(seq_lens, [1] * len(seq_lens), 8, 2, 64, 16, dtype, kernel_device, seed=len(seq_lens))
        qc = QuantCase(case, fmt)
        qc.snapshot()
        _check(qc, _run_decode(qc, window, num_splits), window)


@pytest.mark.parametrize("seed", range(NUM_RANDOM))
def test_extend_quantized_random(kernel_device: str, seed: int) -> None:
    qc, window = _random_case(seed + 1000, kernel_device, decode=False)
    qc.snapshot()
    _check(qc, _run_extend(qc, window), window)


@pytest.mark.parametrize("fmt", FORMATS)
def test_extend_quantized_prefill_and_chunks(kernel_device: str, fmt: str) -> None:
    """A whole prompt, a chunk over a cached prefix, a one-token chunk, block boundaries."""
    for dtype in (torch.float32, torch.bfloat16):
        case = make_case([33, 80, 17, 64], [33, 47, 1, 16], 4, 1, 64, 16, dtype, kernel_device, seed=11)
        qc = QuantCase(case, fmt)
        qc.snapshot()
        _check(qc, _run_extend(qc, None), None)


def _head_major(scale: torch.Tensor) -> torch.Tensor:
    """The same scales as a head-major view: [blocks, block_size, Hkv] over [blocks, Hkv,
    block_size] memory (a head's tokens contiguous: token stride 1, head stride block_size)."""
    blocks, block_size, heads = scale.shape
    out = torch.full((blocks, heads, block_size), float("nan"), dtype=scale.dtype, device=scale.device)
    out = out.transpose(1, 2)
    out.copy_(scale)
    assert out.stride() == (heads * block_size, 1, block_size)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kernel", ["store", "decode", "extend", "verify"])
def test_head_major_scales_give_the_contiguous_results(kernel_device: str, fmt: str, kernel: str) -> None:
    """The kernels take the scales' head stride (stride_ksh / stride_vsh) rather than
    assume 1: head-major scale views give bit for bit the outputs, stored values and
    scales of the pool's [block, token, head] ones, and match the torch reference."""
    if kernel == "verify":
        from test_verify_attention import verify_case

        from rtpllm.kernels.verify_attention import paged_verify_attention_ref, paged_verify_attention_triton

        q, kc, vc, tables, lens, spans, scale = verify_case([50, 21], [5, 3], (8, 4), torch.float32, kernel_device, 5)
        (kq, ks), (vq, vs) = quantize_ref(kc, fmt), quantize_ref(vc, fmt)
        ks2, vs2 = _head_major(ks), _head_major(vs)
        outs = [
            paged_verify_attention_triton(q, kq, vq, tables, lens, spans, scale, 5, num_splits=2, k_scale=a, v_scale=b)
            for a, b in ((ks, vs), (ks2, vs2))
        ]
        ref = paged_verify_attention_ref(q, kq, vq, tables, lens, spans, scale, 5, k_scale=ks2, v_scale=vs2)
        assert torch.equal(outs[0], outs[1])
        assert rel_err(outs[1], ref) < TOL[torch.float32]
        return
    seq_lens, q_lens = ([2, 17, 40], [1, 1, 1]) if kernel == "decode" else ([40, 9, 33], [40, 5, 16])
    case = make_case(seq_lens, q_lens, 8, 4, 32, 16, torch.float32, kernel_device, seed=41)
    runs = []
    for head_major in (False, True):
        qc = QuantCase(case, fmt)
        if head_major:
            qc.k_scale, qc.v_scale = _head_major(qc.k_scale), _head_major(qc.v_scale)
        qc.snapshot()
        out = None
        if kernel == "store":
            store_kv_triton(case.k, case.v, qc.k_cache, qc.v_cache, case.meta.slot_mapping, qc.k_scale, qc.v_scale)
            qc.check_cache_matches_reference_store()
        else:
            out = _run_decode(qc, None, 2) if kernel == "decode" else _run_extend(qc, None)
            _check(qc, out, None)  # the stores and the output against the torch reference
        runs.append((out, qc.k_cache.view(torch.uint8), qc.v_cache.view(torch.uint8), qc.k_scale, qc.v_scale))
    (out0, *stored0), (out1, *stored1) = runs
    assert out0 is None or torch.equal(out0, out1)
    assert all(torch.equal(a, b) for a, b in zip(stored0, stored1, strict=True))


@pytest.mark.parametrize("kernel", ["decode", "verify"])
def test_fp8_dots_in_fp16_match_the_reference_as_closely_as_in_bf16(
    kernel_device: str, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With FP8_F16_DOTS the fp8 tiles and a bf16 query meet in fp16 dots: the output
    matches the torch reference within the bf16 tolerance and no worse than the bf16
    dots do (fp16 keeps more mantissa; the query is clamped to its range), over
    several split counts; a query or a value beyond fp16's range leaves the output
    finite (both saturate)."""
    from rtpllm.kernels import decode_attention

    monkeypatch.setattr(decode_attention, "FP8_WIDEN_PAIRS", False)  # fp16 dots over whole tiles

    def run(f16: bool, huge: bool = False) -> tuple[float, torch.Tensor]:
        monkeypatch.setattr(decode_attention, "FP8_F16_DOTS", f16)
        if kernel == "verify":
            from test_verify_attention import verify_case

            from rtpllm.kernels.verify_attention import (
                paged_verify_attention_ref,
                paged_verify_attention_triton,
            )

            q, kc, vc, tables, lens, spans, scale = verify_case([50, 21], [5, 3], (8, 4), torch.bfloat16, kernel_device, 9)
            if huge:
                q[0, 0, 0] = 1e6
                vc[int(tables[0, 0]), 3, 0, 0] = 1e8
            (kq, ks), (vq, vs) = quantize_ref(kc, "fp8"), quantize_ref(vc, "fp8")
            out = paged_verify_attention_triton(q, kq, vq, tables, lens, spans, scale, 5, num_splits=2, k_scale=ks, v_scale=vs)
            ref = paged_verify_attention_ref(q, kq, vq, tables, lens, spans, scale, 5, k_scale=ks, v_scale=vs)
            return rel_err(out, ref), out
        case = make_case([2, 17, 40, 70], [1] * 4, 8, 2, 64, 16, torch.bfloat16, kernel_device, seed=43)
        if huge:
            case.q[0, 0, 0] = 1e6
            case.v_cache[int(case.meta.block_tables[3, 0]), 5, 0, 0] = 1e8
        errs, outs = [], []
        for splits in (1, 3):
            qc = QuantCase(case, "fp8")
            qc.snapshot()
            out = _run_decode(qc, None, splits)
            errs.append(rel_err(out, qc.reference_out(None)))
            outs.append(out)
        return max(errs), torch.stack(outs)

    (err16, _), (err_bf, _) = run(True), run(False)
    assert err16 < TOL[torch.bfloat16], f"fp16 dots: rel err {err16:.2e}"
    assert err16 <= err_bf * 1.25 + 1e-4, f"fp16 dots {err16:.2e} against bf16 dots {err_bf:.2e}"
    assert torch.isfinite(run(True, huge=True)[1]).all()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("store_first", ["none", "decode", "extend"])
def test_backend_quantized_matches_torch_backend(
    kernel_device: str, fmt: str, store_first: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Triton backend on a mixed decode + extend step equals the torch backend (the
    CPU engine's path) on the same quantized pool: both attend to the stored KV. With
    QUANT_DECODE_STORE_FIRST the decode rows' K/V go through the store kernel first; with
    QUANT_EXTEND_STORE_FIRST the prefill chunks' K/V, read back by the extend kernel."""
    from rtpllm.attention import triton_backend

    monkeypatch.setattr(triton_backend, "QUANT_DECODE_STORE_FIRST", store_first == "decode")
    monkeypatch.setattr(triton_backend, "QUANT_EXTEND_STORE_FIRST", store_first == "extend")
    case = make_case([50, 31, 90, 40], [1, 1, 30, 40], 8, 2, 64, 16, torch.float32, kernel_device, seed=21)
    qc = QuantCase(case, fmt)
    _, k2, v2, ks2, vs2 = qc.clone_pool()
    out = TritonAttentionBackend(prefill_impl="auto").forward(
        case.q, case.k, case.v, qc.k_cache, qc.v_cache, case.meta, case.scale, None, qc.k_scale, qc.v_scale
    )
    ref = TorchReferenceBackend().forward(case.q, case.k, case.v, k2, v2, case.meta, case.scale, None, ks2, vs2)
    assert rel_err(out, ref) < TOL[torch.float32]
    _assert_quantized_equal(qc.k_cache, qc.k_scale, k2, ks2)
    _assert_quantized_equal(qc.v_cache, qc.v_scale, v2, vs2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_quantized_sdpa_prefill_matches_torch_backend(kernel_device: str, fmt: str, dtype: torch.dtype) -> None:
    """A lone uncached prompt beside decodes goes to SDPA (forced here; on its own from
    1,024 tokens): it attends to the rows read back from the quantized cache, so it equals
    the torch backend, which attends to the stored KV, and leaves the same cache."""
    case = make_case([50, 31, 75], [1, 1, 75], 8, 2, 64, 16, dtype, kernel_device, seed=23)
    qc = QuantCase(case, fmt)
    _, k2, v2, ks2, vs2 = qc.clone_pool()
    out = TritonAttentionBackend(prefill_impl="sdpa").forward(
        case.q, case.k, case.v, qc.k_cache, qc.v_cache, case.meta, case.scale, None, qc.k_scale, qc.v_scale
    )
    ref = TorchReferenceBackend().forward(case.q, case.k, case.v, k2, v2, case.meta, case.scale, None, ks2, vs2)
    assert rel_err(out, ref) < TOL[dtype]
    _assert_quantized_equal(qc.k_cache, qc.k_scale, k2, ks2)
    _assert_quantized_equal(qc.v_cache, qc.v_scale, v2, vs2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("route", ["sdpa", "auto-threshold", "auto-off"])
def test_backend_quantized_chunk_over_prefix_through_sdpa(
    kernel_device: str, fmt: str, dtype: torch.dtype, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk over a cached prefix on a quantized cache (chunked prefill, a prefix hit)
    through SDPA over the context read back and dequantized, beside decodes: equal to the
    torch backend, the same cache afterwards, and taken exactly when the switches say
    (prefill_impl "sdpa"; "auto" from QUANT_CHUNK_SDPA_MIN_TOKENS new tokens, never when
    it is None)."""
    from rtpllm.attention import triton_backend

    taken: list[int] = []
    real = TritonAttentionBackend._forward_sdpa
    monkeypatch.setattr(TritonAttentionBackend, "_forward_sdpa", staticmethod(lambda *a: (taken.append(1), real(*a))[1]))
    monkeypatch.setattr(triton_backend, "QUANT_CHUNK_SDPA_MIN_TOKENS", None if route == "auto-off" else 30)
    case = make_case([50, 31, 100], [1, 1, 37], 8, 2, 64, 16, dtype, kernel_device, seed=29)  # 37 new over 63 cached
    qc = QuantCase(case, fmt)
    _, k2, v2, ks2, vs2 = qc.clone_pool()
    backend = TritonAttentionBackend(prefill_impl="sdpa" if route == "sdpa" else "auto")
    out = backend.forward(case.q, case.k, case.v, qc.k_cache, qc.v_cache, case.meta, case.scale, None, qc.k_scale, qc.v_scale)
    ref = TorchReferenceBackend().forward(case.q, case.k, case.v, k2, v2, case.meta, case.scale, None, ks2, vs2)
    assert rel_err(out, ref) < TOL[dtype]
    _assert_quantized_equal(qc.k_cache, qc.k_scale, k2, ks2)
    _assert_quantized_equal(qc.v_cache, qc.v_scale, v2, vs2)
    assert taken == ([] if route == "auto-off" else [1])


def _sdpa_taken(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The prefill sequences the backend sends to SDPA, in order (the real path still runs)."""
    taken: list[int] = []
    real = TritonAttentionBackend._forward_sdpa

    def spy(*args: object) -> None:
        taken.append(args[6])  # type: ignore[arg-type]  # the sequence index
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(TritonAttentionBackend, "_forward_sdpa", staticmethod(spy))
    return taken


@pytest.mark.parametrize("fmt", FORMATS + ["plain"])
def test_backend_routes_each_prefill_sequence_on_its_own(kernel_device: str, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step with decodes and several prefill sequences: each long one goes to SDPA on its
    own (two uncached prompts, and on a quantized cache a chunk over a cached prefix; an
    uncached prompt only from the prompt threshold, whatever the cache), the short ones
    between them to the extend kernel in runs; the result equals the torch
    backend's and the cache holds what its store would."""
    from rtpllm.attention import triton_backend

    taken = _sdpa_taken(monkeypatch)
    monkeypatch.setattr(triton_backend, "SDPA_PREFILL_MIN_TOKENS", 40)
    monkeypatch.setattr(triton_backend, "QUANT_CHUNK_SDPA_MIN_TOKENS", 30)
    # seqs: 2 decodes | 45 uncached | 5 over 40 | 37 over 63 | 35 uncached | 50 uncached | 8 over 20
    # (the uncached 35 is past the chunk threshold but not the prompt one: extend kernel)
    seq_lens, q_lens = [50, 31, 45, 45, 100, 35, 50, 28], [1, 1, 45, 5, 37, 35, 50, 8]
    case = make_case(seq_lens, q_lens, 8, 2, 64, 16, torch.float32, kernel_device, seed=31)
    backend = TritonAttentionBackend(prefill_impl="auto")
    if fmt == "plain":
        k2, v2 = case.k_cache.clone(), case.v_cache.clone()
        out = backend.forward(case.q, case.k, case.v, case.k_cache, case.v_cache, case.meta, case.scale)
        ref = TorchReferenceBackend().forward(case.q, case.k, case.v, k2, v2, case.meta, case.scale)
        torch.testing.assert_close(case.k_cache, k2)
        torch.testing.assert_close(case.v_cache, v2)
        assert taken == [2, 6]
    else:
        qc = QuantCase(case, fmt)
        _, k2, v2, ks2, vs2 = qc.clone_pool()
        out = backend.forward(case.q, case.k, case.v, qc.k_cache, qc.v_cache, case.meta, case.scale, None, qc.k_scale, qc.v_scale)
        ref = TorchReferenceBackend().forward(case.q, case.k, case.v, k2, v2, case.meta, case.scale, None, ks2, vs2)
        _assert_quantized_equal(qc.k_cache, qc.k_scale, k2, ks2)
        _assert_quantized_equal(qc.v_cache, qc.v_scale, v2, vs2)
        assert taken == [2, 4, 6]
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_model_with_quantized_kv_triton_matches_torch(cuda_device: str, tmp_path: Path, fmt: str, dtype: str) -> None:
    """A whole tiny model on the GPU with fp8/int8 KV: greedy tokens of the Triton backend
    equal the torch backend's (both attend to the same quantized cache) through chunked
    prefill, decode batches and prefix-cache hits; near-ties excepted as in
    test_model_triton.py."""
    from test_model_triton import TIE_GAP, _assert_same_greedy, _prompts

    from rtpllm import LLM, SamplingParams
    from rtpllm.loader.random_checkpoint import write_random_checkpoint

    model_dir = write_random_checkpoint(tmp_path / "llama", "llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    runs = {}
    for backend in ("triton", "torch"):
        llm = LLM(str(model_dir), dtype=dtype, device="cuda", attention_backend=backend, max_num_batched_tokens=64,
                  block_size=16, max_model_len=1024, num_blocks=256, kv_cache_dtype=fmt)
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
        first, second = _prompts(0)
        runs[backend] = (llm.generate(first, params), llm.generate(second, params))
        llm.close()
    assert any(o.num_cached_tokens > 0 for o in runs["triton"][1]), "round two should hit the prefix cache"
    # The two backends attend to the same quantized cache (the kernel tests above check
    # that exactly), but a bf16 difference in one layer's output can flip an fp8 rounding
    # of the next layer's K/V: e4m3 keeps 3 mantissa bits to bf16's 7, so near-ties are
    # wider. Measured on an H100 (2026-12-05): bf16 + fp8 first differed at token 34 of
    # 40 with a top-2 gap of 0.375, above bf16's 0.25 bound.
    tie_gap = TIE_GAP[dtype] * (4 if fmt == "fp8" else 1)
    for ours, ref in zip(runs["triton"], runs["torch"], strict=True):
        _assert_same_greedy(ours, ref, dtype, tie_gap)


def test_key_transforms_on_the_gpu_and_their_quantized_cache_serves(cuda_device: str, tmp_path: Path) -> None:
    """K smoothing and K centering (rtpllm.models.k_smoothing, k_centering: the shift in
    the Triton RoPE kernel) on the GPU with the Triton backend: with plain KV a plan's
    vectors leave greedy outputs as they were; with int8 KV and the vectors, the Triton
    backend gives the torch backend's greedy tokens (both attend to the same quantized
    (k - m) / s), near-ties excepted as in test_model_triton.py."""
    from test_model_triton import _assert_same_greedy, _prompts

    from rtpllm import LLM, SamplingParams
    from rtpllm.kvcache.kv_plan import KVCachePlan
    from rtpllm.loader.random_checkpoint import write_random_checkpoint
    from rtpllm.models.config import ModelConfig
    from rtpllm.models.k_smoothing import smoothing_vectors

    model_dir = write_random_checkpoint(tmp_path / "qwen2", "qwen2", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    cfg = ModelConfig.from_dir(model_dir)
    g = torch.Generator().manual_seed(0)
    vectors = {i: smoothing_vectors(torch.rand(cfg.num_kv_heads, cfg.head_dim, generator=g) * 8 + 0.1, 1.0).tolist() for i in range(cfg.num_layers)}
    shifts = {i: (torch.randn(cfg.num_kv_heads, cfg.head_dim, generator=g) * 4).tolist() for i in range(cfg.num_layers)}
    for name, layers in (("plain", "auto"), ("int8", "int8")):
        KVCachePlan((layers,) * cfg.num_layers, k_smooth=vectors, k_center=shifts).save(tmp_path / f"{name}.json")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    first, _ = _prompts(1)

    def run(backend: str, **kv: object) -> list:
        llm = LLM(str(model_dir), dtype="float32", device="cuda", attention_backend=backend, max_num_batched_tokens=64,
                  block_size=16, max_model_len=1024, num_blocks=256, **kv)  # type: ignore[arg-type]
        try:
            return llm.generate(first, params)
        finally:
            llm.close()

    _assert_same_greedy(run("triton", kv_cache_plan=str(tmp_path / "plain.json")), run("triton"), "float32")
    quantized = str(tmp_path / "int8.json")
    _assert_same_greedy(run("triton", kv_cache_plan=quantized), run("torch", kv_cache_plan=quantized), "float32")


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_with_quantized_kv_triton_equals_torch_on_cpu(kernel_device: str, tmp_path: Path, fmt: str) -> None:
    """The same on the CPU interpreter (fp32, exact): the engine with the Triton backend
    and fp8/int8 KV gives the torch backend's greedy tokens, through chunked prefill,
    decode batches and a prefix-cache hit."""
    if kernel_device != "cpu":
        pytest.skip("the GPU runs test_model_with_quantized_kv_triton_matches_torch")
    from rtpllm import LLM, SamplingParams
    from rtpllm.attention.backend import register_backend
    from rtpllm.loader.random_checkpoint import write_random_checkpoint

    # Registered under its own name: on the CPU "triton" is not offered (no CUDA).
    register_backend("triton-interpreter", TritonAttentionBackend)
    model_dir = write_random_checkpoint(tmp_path / "llama", "llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    prompts = [[(7 * i + j) % 250 + 3 for i in range(n)] for j, n in enumerate((5, 40, 90))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for backend in ("triton-interpreter", "torch"):
        llm = LLM(str(model_dir), device="cpu", attention_backend=backend, max_num_batched_tokens=32, block_size=16,
                  num_blocks=64, kv_cache_dtype=fmt)
        outs = llm.generate(prompts, params) + llm.generate([prompts[2][:70] + [9, 9, 9]], params)
        assert outs[-1].num_cached_tokens == 64
        tokens[backend] = [o.outputs[0].token_ids for o in outs]
    assert tokens["triton-interpreter"] == tokens["torch"]


def test_bench_quant_chunk_rows_run(kernel_device: str) -> None:
    """bench/attention.py --quant-chunk: the quantized extend kernel and the SDPA path it
    times agree (smoke shape off the GPU, where the timings mean nothing)."""
    from bench import attention

    if kernel_device != "cpu":
        pytest.skip("the GPU runs the bench itself (bench/gpu_session.sh quantchunk)")
    (row,) = attention.quant_chunk_rows(kernel_device, smoke=True)
    assert row["quant_extend_ms"] > 0 and row["quant_sdpa_ms"] > 0 and row["max_abs_diff"] < 2e-2


def test_bench_quant_short_decode_rows_run(kernel_device: str) -> None:
    """bench/attention.py --quant-short-decode runs every format and launch it lists
    (smoke shape off the GPU, where the timings mean nothing)."""
    from bench import attention

    if kernel_device != "cpu":
        pytest.skip("the GPU runs the bench itself (bench/gpu_session.sh quantshort)")
    rows = attention.quant_short_decode_rows(kernel_device, smoke=True)
    assert [r["fmt"] for r in rows] == (
        ["bf16", "bf16, longest first"] + ["fp8"] * 3 + ["fp8 f16 dots"] * 2 + ["int8"] * 2
        + ["fp8 f16 halves"] * 2 + ["fp8 f16 halves, longest first"] + ["int8 f16 halves"] * 2 + ["int8 f16 halves, longest first"]
    )  # fmt: skip
    assert all(r["ms"] > 0 for r in rows), [r.get("error") for r in rows]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("head_dim", "window"), [(64, None), (128, None), (64, 24)])
def test_tiles_widened_in_halves_match_tiles_loaded_whole(
    kernel_device: str, fmt: str, head_dim: int, window: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FP8_WIDEN_PAIRS / INT8_WIDEN_PAIRS (tiles loaded as 16-bit words, each widened
    into its even and odd halves, the dots over the two apart; on the CPU through bit
    operations instead of the inline PTX) give the output of tiles loaded whole (fp8:
    the same fp16 dots; int8: bf16 dots, so up to the probabilities' rounding) and
    match the torch reference, over split counts, ragged contexts and a sliding window;
    the new token is stored as before."""
    from rtpllm.kernels import decode_attention

    monkeypatch.setattr(decode_attention, "FP8_F16_DOTS", True)
    case = make_case([2, 17, 40, 70, 300], [1] * 5, 8, 2, head_dim, 16, torch.bfloat16, kernel_device, seed=53)
    for splits in (1, 3):
        runs = []
        for halves in (False, True):
            monkeypatch.setattr(decode_attention, "FP8_WIDEN_PAIRS", halves)
            monkeypatch.setattr(decode_attention, "INT8_WIDEN_PAIRS", halves)
            qc = QuantCase(case, fmt)
            qc.snapshot()
            runs.append((_run_decode(qc, window, splits), qc))
            assert rel_err(runs[-1][0], qc.reference_out(window)) < TOL[torch.bfloat16]
        (whole, qa), (halves_out, qb) = runs
        assert rel_err(halves_out, whole) < (2e-3 if fmt == "fp8" else 4e-3), f"splits {splits}"
        _assert_quantized_equal(qa.k_cache, qa.k_scale, qb.k_cache, qb.k_scale)
        _assert_quantized_equal(qa.v_cache, qa.v_scale, qb.v_cache, qb.v_scale)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("window", [None, 24])
def test_extend_new_tokens_from_cache_equal_the_fused_path(kernel_device: str, fmt: str, window: int | None) -> None:
    """The extend kernel reading the new tokens back from a quantized cache (after the
    store kernel wrote them: QUANT_EXTEND_STORE_FIRST) gives the fused path's output
    (in-register quantization, its own write) and leaves the same cache: chunks over a
    prefix and whole prompts, ragged lengths, with and without a sliding window."""
    case = make_case([50, 96, 40, 77], [20, 96, 40, 33], 8, 2, 64, 16, torch.bfloat16, kernel_device, seed=31)
    max_q = case.meta.max_query_len
    runs = []
    for from_cache in (False, True):
        qc = QuantCase(case, fmt)
        if from_cache:
            store_kv_triton(case.k, case.v, qc.k_cache, qc.v_cache, case.meta.slot_mapping, qc.k_scale, qc.v_scale)
        out = paged_extend_attention_triton(
            case.q, case.k, case.v, qc.k_cache, qc.v_cache, case.meta.block_tables, case.meta.query_start_loc,
            case.meta.seq_lens, None if from_cache else case.meta.slot_mapping, case.scale, window, max_q,
            k_scale=qc.k_scale, v_scale=qc.v_scale, new_from_cache=from_cache,
        )  # fmt: skip
        runs.append((out, qc))
    (fused, qa), (read_back, qb) = runs
    assert rel_err(read_back, fused) < 2e-3
    _assert_quantized_equal(qa.k_cache, qa.k_scale, qb.k_cache, qb.k_scale)
    _assert_quantized_equal(qa.v_cache, qa.v_scale, qb.v_cache, qb.v_scale)


def test_bench_quant_prefill_rows_run(kernel_device: str) -> None:
    """bench/attention.py --quant-prefill runs each format both ways, and storing first
    gives the fused path's output (smoke shape off the GPU)."""
    from bench import attention

    if kernel_device != "cpu":
        pytest.skip("the GPU runs the bench itself (bench/gpu_session.sh quantprefill)")
    rows = attention.quant_prefill_rows(kernel_device, smoke=True)
    assert [(r["fmt"], r.get("store_first")) for r in rows] == [("bf16", None), ("fp8", False), ("fp8", True)]
    assert all(r["ms"] > 0 for r in rows) and rows[2]["max_abs_diff"] < 1e-2
