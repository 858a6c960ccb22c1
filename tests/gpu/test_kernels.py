"""Every Triton kernel against its torch reference on random inputs.

On a GPU the shapes are realistic (batch up to 256, contexts past 8K, Llama-8B heads); on
the CPU under TRITON_INTERPRET=1 the same tests run on small shapes. Attention outputs are
compared with an fp32 reference computed on upcast copies of the same inputs (METHOD.md:
||out - ref|| / ||ref||), outputs are poisoned with NaN before each run, and the cache
must afterwards hold exactly the new K/V at their slots and nothing else changed.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from gpu_env import ON_GPU
from paged_cases import TOLERANCE, PagedCase, make_case, rel_err

from rtpllm.attention.backend import AttentionMetadata, decode_spans
from rtpllm.attention.torch_ref import TorchReferenceBackend
from rtpllm.attention.triton_backend import TritonAttentionBackend
from rtpllm.kernels.activation import silu_and_mul_ref, silu_and_mul_triton
from rtpllm.kernels.decode_attention import (
    decode_num_splits,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)
from rtpllm.kernels.extend_attention import paged_extend_attention_ref, paged_extend_attention_triton
from rtpllm.kernels.kv_cache import store_kv_ref, store_kv_triton
from rtpllm.kernels.rmsnorm import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)
from rtpllm.kernels.rope import apply_rope_ref, apply_rope_triton

pytestmark = pytest.mark.gpu

# (q heads, kv heads): GQA ratios 1, 4 and 8, and Llama-3.1-8B's 32/8 on the GPU.
HEADS = [(8, 8), (16, 4), (16, 2), (32, 8)] if ON_GPU else [(2, 2), (4, 1), (8, 2), (8, 1)]
NUM_RANDOM = 48 if ON_GPU else 16


def _expected_caches(case: PagedCase, slots: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    kc, vc = case.clone_caches()
    store_kv_ref(case.k[rows], case.v[rows], kc, vc, slots)
    return kc, vc


def _fp32_inputs(
    case: PagedCase,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    kc, vc = case.clone_caches(torch.float32)
    return case.q.float(), case.k.float(), case.v.float(), kc, vc


# ----------------------------------------------------------------------------- decode


def _check_decode(
    case: PagedCase,
    window: int | None,
    num_splits: int | None,
    fused: bool = True,
    order: torch.Tensor | None = None,
) -> None:
    meta = case.meta
    dtype = case.q.dtype
    q32, k32, v32, kc32, vc32 = _fp32_inputs(case)
    ref = paged_decode_attention_ref(
        q32, k32, v32, kc32, vc32, meta.block_tables, meta.seq_lens, meta.slot_mapping, case.scale, window
    )
    exp_k, exp_v = _expected_caches(case, meta.slot_mapping, slice(None))
    if not fused:  # the cache already holds the newest token
        store_kv_ref(case.k, case.v, case.k_cache, case.v_cache, meta.slot_mapping)
    out = torch.full_like(case.q, float("nan"))
    paged_decode_attention_triton(
        case.q,
        case.k if fused else None,
        case.v if fused else None,
        case.k_cache,
        case.v_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.slot_mapping if fused else None,
        case.scale,
        window,
        out=out,
        num_splits=num_splits,
        max_seq_len=meta.max_seq_len,
        order=order,
    )
    assert not torch.isnan(out).any(), "unwritten (or NaN) output elements"
    err = rel_err(out, ref)
    assert err < TOLERANCE[dtype], f"rel err {err:.2e}"
    assert torch.equal(case.k_cache, exp_k) and torch.equal(case.v_cache, exp_v), "cache contents differ"


def _random_decode(seed: int, device: str) -> tuple[PagedCase, int | None, int | None]:
    rng = random.Random(seed)
    if ON_GPU:
        batch = rng.choice([1, 2, 3, 16, 64, 256])
        max_ctx = {1: 17000, 2: 9000, 3: 9000, 16: 4500, 64: 2100, 256: 1100}[batch]
        head_dim = rng.choice([64, 128, 128])
    else:
        batch = rng.choice([1, 2, 3, 5])
        max_ctx = 300
        head_dim = rng.choice([64, 128])
    num_heads, num_kv_heads = rng.choice(HEADS)
    block_size = rng.choice([16, 32])
    dtype = rng.choice([torch.bfloat16, torch.float16])
    seq_lens = [rng.randint(1, max_ctx) for _ in range(batch)]
    window = rng.choice([None, None, rng.randint(1, max_ctx)])
    num_splits = rng.choice([None, None, rng.randint(1, 16)])
    case = make_case(
        seq_lens, [1] * batch, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed
    )
    return case, window, num_splits


@pytest.mark.parametrize("seed", range(NUM_RANDOM))
def test_decode_random(kernel_device: str, seed: int) -> None:
    case, window, num_splits = _random_decode(seed, kernel_device)
    _check_decode(case, window, num_splits)


@pytest.mark.parametrize(
    ("seq_lens", "window", "num_splits"),
    [
        ([1], None, None),  # only the new token
        ([1, 2, 16, 17, 64, 65], None, None),  # block / tile boundaries
        ([1, 2, 16, 17, 64, 65], None, 5),
        ([100, 3], None, 64),  # many empty partitions
        ([100, 130], 1, None),  # window of one: the new token alone
        ([100, 130], 37, 3),
        ([40, 7], 500, None),  # window longer than the context
    ],
)
def test_decode_edges(
    kernel_device: str, seq_lens: list[int], window: int | None, num_splits: int | None
) -> None:
    for dtype in (torch.bfloat16, torch.float32):
        case = make_case(
            seq_lens, [1] * len(seq_lens), 8, 2, 64, 16, dtype, kernel_device, seed=len(seq_lens)
        )
        _check_decode(case, window, num_splits)


@pytest.mark.parametrize(("head_dim", "block_size"), [(96, 16), (128, 64), (64, 24), (256, 32), (16, 16)])
def test_decode_odd_shapes(kernel_device: str, head_dim: int, block_size: int) -> None:
    case = make_case(
        [1, 50, 333], [1, 1, 1], 8, 2, head_dim, block_size, torch.bfloat16, kernel_device, seed=3
    )
    _check_decode(case, None, None)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_longest_first_order(kernel_device: str, num_splits: int | None) -> None:
    """Rows launched in a given order (longest context first) give the same result and
    the same cache writes as in batch order."""
    lens = [5, 300, 17, 128, 1, 64]
    case = make_case(lens, [1] * len(lens), 8, 2, 64, 16, torch.bfloat16, kernel_device, seed=11)
    order = torch.tensor(sorted(range(len(lens)), key=lambda i: -lens[i]), dtype=torch.int32, device=kernel_device)
    _check_decode(case, None, num_splits, order=order)


def test_backend_mixed_step_in_longest_first_order(kernel_device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed step's decode rows through the backend with a launch order
    (AttentionMetadata.decode_order from longest_first) equal the fp32 reference, and
    the cache holds every row's K/V."""
    from rtpllm.attention import backend

    monkeypatch.setattr(backend, "LONGEST_FIRST_MIN_ROWS", 2)
    seq_lens, q_lens = [9, 140, 33, 70], [1, 1, 1, 20]  # three decodes, then a chunk
    case = make_case(seq_lens, q_lens, 8, 2, 64, 16, torch.bfloat16, kernel_device, seed=12)
    order = backend.longest_first(np.asarray(seq_lens[:3]))
    assert order is not None and order.tolist() == [1, 2, 0]
    case.meta.decode_order = torch.from_numpy(order).to(kernel_device)
    q32, k32, v32, kc32, vc32 = _fp32_inputs(case)
    ref = TorchReferenceBackend().forward(q32, k32, v32, kc32, vc32, case.meta, case.scale)
    exp_k, exp_v = _expected_caches(case, case.meta.slot_mapping, slice(None))
    out = TritonAttentionBackend().forward(case.q, case.k, case.v, case.k_cache, case.v_cache, case.meta, case.scale)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
    assert torch.equal(case.k_cache, exp_k) and torch.equal(case.v_cache, exp_v)


def test_decode_unfused_cache_read(kernel_device: str) -> None:
    """With k/v None the kernel reads the newest token from the cache too."""
    case = make_case([5, 77, 200], [1, 1, 1], 8, 2, 64, 16, torch.float16, kernel_device, seed=9)
    _check_decode(case, None, 3, fused=False)


def test_decode_padded_rows(kernel_device: str) -> None:
    """A CUDA-graph batch filler (seq_len 0, slot -1) yields zeros and writes nothing."""
    case = make_case([30, 30], [1, 1], 4, 1, 64, 16, torch.bfloat16, kernel_device, seed=4)
    meta = case.meta
    meta.seq_lens[1] = 0
    meta.slot_mapping[1] = -1
    before_k, before_v = case.clone_caches()
    out = torch.full_like(case.q, float("nan"))
    paged_decode_attention_triton(
        case.q,
        case.k,
        case.v,
        case.k_cache,
        case.v_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.slot_mapping,
        case.scale,
        None,
        out=out,
        num_splits=4,
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    slot0 = int(meta.slot_mapping[0])
    changed = (case.k_cache != before_k).flatten(0, 1).any(-1).any(-1).nonzero().flatten().tolist()
    assert changed in ([], [slot0])
    assert not torch.isnan(out[0]).any()


# ----------------------------------------------------------------------------- extend


def _check_extend(case: PagedCase, window: int | None, seq_base: int) -> None:
    meta = case.meta
    dtype = case.q.dtype
    q32, k32, v32, kc32, vc32 = _fp32_inputs(case)
    first = meta.query_start_loc_host[seq_base]
    ref = paged_extend_attention_ref(
        q32,
        k32,
        v32,
        kc32,
        vc32,
        meta.block_tables,
        meta.query_start_loc,
        meta.seq_lens,
        meta.slot_mapping,
        case.scale,
        window,
        meta.max_query_len,
        seq_base,
    )
    exp_k, exp_v = _expected_caches(case, meta.slot_mapping[first:], slice(first, None))
    out = torch.full_like(case.q, float("nan"))
    paged_extend_attention_triton(
        case.q,
        case.k,
        case.v,
        case.k_cache,
        case.v_cache,
        meta.block_tables,
        meta.query_start_loc,
        meta.seq_lens,
        meta.slot_mapping,
        case.scale,
        window,
        meta.max_query_len,
        seq_base,
        out,
    )
    assert torch.isnan(out[:first]).all(), "rows of other sequences were written"
    assert not torch.isnan(out[first:]).any(), "unwritten (or NaN) output elements"
    err = rel_err(out[first:], ref[first:])
    assert err < TOLERANCE[dtype], f"rel err {err:.2e}"
    assert torch.equal(case.k_cache, exp_k) and torch.equal(case.v_cache, exp_v), "cache contents differ"


def _random_extend(seed: int, device: str) -> tuple[PagedCase, int | None, int]:
    rng = random.Random(1000 + seed)
    if ON_GPU:
        batch = rng.choice([1, 2, 5, 16])
        max_q, max_prefix = {1: 4096, 2: 2048, 5: 1024, 16: 300}[batch], rng.choice([0, 64, 4096])
        head_dim = rng.choice([64, 128, 128])
    else:
        batch = rng.choice([1, 2, 4])
        max_q, max_prefix = 80, rng.choice([0, 40, 150])
        head_dim = rng.choice([64, 128])
    num_heads, num_kv_heads = rng.choice(HEADS)
    block_size = rng.choice([16, 32])
    dtype = rng.choice([torch.bfloat16, torch.float16])
    num_decodes = rng.choice([0, 0, rng.randint(1, 3)])
    q_lens = [1] * num_decodes + [rng.randint(1, max_q) for _ in range(batch)]
    seq_lens = [rng.randint(2, 300) for _ in range(num_decodes)]
    seq_lens += [q + rng.randint(0, max_prefix) for q in q_lens[num_decodes:]]
    window = rng.choice([None, None, rng.randint(1, max_q + max_prefix)])
    case = make_case(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed)
    return case, window, num_decodes


@pytest.mark.parametrize("seed", range(NUM_RANDOM))
def test_extend_random(kernel_device: str, seed: int) -> None:
    case, window, seq_base = _random_extend(seed, kernel_device)
    _check_extend(case, window, seq_base)


@pytest.mark.parametrize(
    ("seq_lens", "q_lens", "window"),
    [
        ([1], [1], None),
        ([64, 65, 130], [64, 1, 66], None),  # tile boundaries, a 1-token chunk after a prefix
        ([200, 90], [70, 90], 1),
        ([200, 90], [70, 90], 33),
        ([17, 300], [17, 129], 1000),
    ],
)
def test_extend_edges(kernel_device: str, seq_lens: list[int], q_lens: list[int], window: int | None) -> None:
    for dtype in (torch.bfloat16, torch.float32):
        case = make_case(seq_lens, q_lens, 8, 2, 64, 16, dtype, kernel_device, seed=sum(q_lens))
        _check_extend(case, window, 0)


@pytest.mark.parametrize(("head_dim", "block_size"), [(96, 16), (64, 24), (256, 32), (16, 16)])
def test_extend_odd_shapes(kernel_device: str, head_dim: int, block_size: int) -> None:
    case = make_case([20, 150], [20, 70], 4, 2, head_dim, block_size, torch.float16, kernel_device, seed=5)
    _check_extend(case, None, 0)


def test_prefill_4096(kernel_device: str) -> None:
    """The benchmark's prefill shape (Llama-8B heads, one 4096-token prompt)."""
    if not ON_GPU:
        pytest.skip("realistic shape: GPU only")
    case = make_case([4096], [4096], 32, 8, 128, 16, torch.bfloat16, kernel_device, seed=11)
    _check_extend(case, None, 0)


# ----------------------------------------------------------------------------- backend


@pytest.mark.parametrize("prefill_impl", ["triton", "sdpa", "auto"])
@pytest.mark.parametrize("window", [None, 40])
def test_backend_mixed_step(kernel_device: str, prefill_impl: str, window: int | None) -> None:
    """Decodes + extend chunks in one step: same as the torch backend (fp32 reference)."""
    big = 2048 if ON_GPU else 60
    for seq_lens, q_lens in (
        ([9, 130, 31, big + 50, 77], [1, 1, 1, 50, 77]),  # decodes, a chunk over a prefix, a prompt
        ([33, big], [1, big]),  # decode + one uncached prompt (the SDPA case)
    ):
        for dtype in (torch.bfloat16, torch.float32):
            case = make_case(seq_lens, q_lens, 8, 2, 64, 16, dtype, kernel_device, seed=len(seq_lens))
            q32, k32, v32, kc32, vc32 = _fp32_inputs(case)
            ref = TorchReferenceBackend().forward(q32, k32, v32, kc32, vc32, case.meta, case.scale, window)
            exp_k, exp_v = _expected_caches(case, case.meta.slot_mapping, slice(None))
            out = TritonAttentionBackend(prefill_impl=prefill_impl).forward(
                case.q, case.k, case.v, case.k_cache, case.v_cache, case.meta, case.scale, window
            )
            err = rel_err(out, ref)
            assert err < TOLERANCE[dtype], f"rel err {err:.2e}"
            assert torch.equal(case.k_cache, exp_k) and torch.equal(case.v_cache, exp_v)


def test_sdpa_lengths_fall_in_few_buckets() -> None:
    """A prompt's causal SDPA call runs at a bucketed length (cuDNN builds a graph per
    shape): never shorter, at most a quarter longer from 4 buckets an octave, 64-aligned,
    and few distinct lengths over a wide range."""
    from rtpllm.attention.triton_backend import bucketed_len

    lengths = {bucketed_len(n, 4) for n in range(1, 32769)}
    for n in (1, 63, 64, 65, 700, 1024, 1025, 4096, 4097, 32768):
        b = bucketed_len(n, 4)
        assert b >= n and b % 64 == 0 and (b - n) <= max(63, n // 4), (n, b)
    assert bucketed_len(4096, 4) == 4096 and bucketed_len(700, 4) == 768
    assert len(lengths) <= 4 * 10  # 64 ... 32768: about 4 per octave


@pytest.mark.parametrize("n", [5, 45, 77, 130])
def test_causal_sdpa_padded_equals_exact(n: int) -> None:
    """Zero rows padded after the prompt change no real row's output (causal), with GQA."""
    from rtpllm.attention.triton_backend import bucketed_len, causal_sdpa

    gen = torch.Generator().manual_seed(n)
    q = torch.randn(1, 8, n, 64, generator=gen)
    k, v = (torch.randn(1, 2, n, 64, generator=gen) for _ in range(2))
    exact = causal_sdpa(q, k, v, 0.125, None)
    padded = causal_sdpa(q, k, v, 0.125, 4)
    assert bucketed_len(n, 4) > n  # the padded path ran
    assert padded.shape == exact.shape
    torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-5)


def test_bench_new_shape_rows_run(kernel_device: str) -> None:
    """bench/attention.py --new-shapes: every case times its first and steady call at
    each length (smoke lengths off the GPU, where the timings mean nothing); a pinned
    backend that cannot take the shape is a row with its error, not a crash."""
    from bench import attention

    if kernel_device != "cpu":
        pytest.skip("the GPU runs the bench itself (bench/gpu_session.sh newshapes)")
    rows = attention.new_shape_rows(kernel_device, smoke=True)
    timed = {(r["case"], r["len"]) for r in rows if r.get("first_ms", 0) > 0 and r.get("ms", 0) > 0}
    for case in ("causal_exact", "causal_bucketed", "vision_default", "vision_flash"):
        assert {(case, 70), (case, 130)} <= timed, case
    assert {("causal_bucketed_again", 67), ("causal_bucketed_again", 127)} <= timed
    assert all("error" in r for r in rows if (r["case"], r["len"]) not in timed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grouped", [True, False])
def test_backend_verify_rows_as_decode_rows(kernel_device: str, dtype: torch.dtype, grouped: bool) -> None:
    """A speculative verify step packs each of a sequence's k + 1 new tokens as a decode
    row ending at its own position (decode_rows_share_seqs): the result equals the same
    tokens attended as extend rows (the fp32 reference), and the cache holds every row's
    K/V. Fused store-and-attend would let a row read a sibling's slot before it is written.
    `grouped`: with decode_spans, each sequence's rows read its KV once (the verify
    kernel); without, row by row (the decode kernel)."""
    big = 700 if ON_GPU else 40
    seq_lens, q_lens = [12, big, 33], [1, 5, 3]  # a plain decode, then two verifies
    case = make_case(seq_lens, q_lens, 8, 2, 64, 16, dtype, kernel_device, seed=5)
    q32, k32, v32, kc32, vc32 = _fp32_inputs(case)
    ref = TorchReferenceBackend().forward(q32, k32, v32, kc32, vc32, case.meta, case.scale)
    exp_k, exp_v = _expected_caches(case, case.meta.slot_mapping, slice(None))
    rows = [(i, s - q + j + 1) for i, (s, q) in enumerate(zip(seq_lens, q_lens, strict=True)) for j in range(q)]
    # Rows in reverse: no kernel may rely on a sibling row's program having run first (the
    # interpreter runs programs in order, and would hide a fused store's race otherwise).
    order = list(reversed(range(len(rows))))
    rows = [rows[t] for t in order]
    tables = case.meta.block_tables[[i for i, _ in rows]]
    lens = [n for _, n in rows]
    dev = case.meta.seq_lens.device
    idx = torch.tensor(order, device=dev)
    meta = AttentionMetadata(
        slot_mapping=case.meta.slot_mapping[idx],
        query_start_loc=torch.arange(len(rows) + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        block_tables=tables,
        num_decodes=len(rows),
        max_query_len=1,
        max_seq_len=max(lens),
        block_size=case.meta.block_size,
        query_start_loc_host=list(range(len(rows) + 1)),
        seq_lens_host=lens,
        decode_rows_share_seqs=True,
    )
    if grouped:
        meta.decode_spans = torch.tensor(decode_spans(list(reversed(q_lens))), dtype=torch.int32, device=dev)
        meta.max_decode_span = max(q_lens)
        meta.num_decode_groups = len(q_lens)
    out = TritonAttentionBackend().forward(case.q[idx], case.k[idx], case.v[idx], case.k_cache, case.v_cache, meta, case.scale)
    err = rel_err(out, ref[idx])
    assert err < TOLERANCE[dtype], f"rel err {err:.2e}"
    assert torch.equal(case.k_cache, exp_k) and torch.equal(case.v_cache, exp_v)


def test_decode_cuda_graph_replay(cuda_device: str) -> None:
    """Captured once with a fixed num_splits, the decode launch replays correctly for new
    contexts, block tables, slots and q/k/v written into the same device buffers."""
    batch, block_size, max_ctx = 8, 16, 4000
    base = make_case(
        [max_ctx] * batch, [1] * batch, 8, 2, 128, block_size, torch.bfloat16, cuda_device, seed=0
    )
    num_blocks, width = base.k_cache.shape[0], base.meta.block_tables.shape[1]
    splits = decode_num_splits(batch, 2, 4, max_ctx)
    tables = base.meta.block_tables.clone()
    seq_lens = base.meta.seq_lens.clone()
    slots = base.meta.slot_mapping.clone()
    q, k, v = base.q.clone(), base.k.clone(), base.v.clone()
    out = torch.empty_like(q)

    def step() -> None:
        paged_decode_attention_triton(
            q,
            k,
            v,
            base.k_cache,
            base.v_cache,
            tables,
            seq_lens,
            slots,
            base.scale,
            None,
            out=out,
            num_splits=splits,
        )

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(3):
        gen = torch.Generator().manual_seed(trial)
        lens = torch.randint(1, max_ctx + 1, (batch,), generator=gen)
        new_tables = torch.randperm(num_blocks, generator=gen)[: batch * width].view(batch, width).int()
        last = lens - 1
        new_slots = new_tables.gather(1, (last // block_size).view(-1, 1)).view(-1).long() * block_size
        tables.copy_(new_tables)
        seq_lens.copy_(lens.int())
        slots.copy_(new_slots + last % block_size)
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
        kc32, vc32 = base.k_cache.float(), base.v_cache.float()
        ref = paged_decode_attention_ref(
            q.float(), k.float(), v.float(), kc32, vc32, tables, seq_lens, slots, base.scale, None
        )
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]


# ----------------------------------------------------------------------------- small ops

CLOSE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-3},
    # One fp16 ulp (2**-10 relative): a cast at a different point may round the other way.
    torch.float16: {"rtol": 2**-9, "atol": 1e-3},
}
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative error (norm) allowed against a float32 computation, per METHOD.md.
REL_TO_FP32 = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def assert_like_eager(out: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor) -> None:
    """A fused kernel computes in float32 and rounds once, where the eager code rounds
    after each op: in half precision they may differ by an ulp. Hold the kernel to the
    float32 result instead: no worse than eager (with slack) and within REL_TO_FP32."""
    assert not torch.isnan(out).any()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, eager, **CLOSE[torch.float32])
        return
    exact = exact.float()
    err = ((out.float() - exact).norm() / exact.norm()).item()
    eager_err = ((eager.float() - exact).norm() / exact.norm()).item()
    assert err <= max(1.25 * eager_err, 1e-6) and err < REL_TO_FP32[out.dtype], (err, eager_err)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_store_kv(kernel_device: str, dtype: torch.dtype) -> None:
    case = make_case([40, 17, 300 if ON_GPU else 90], [40, 3, 64], 4, 2, 64, 16, dtype, kernel_device, seed=2)
    slots = case.meta.slot_mapping.clone()
    slots[5] = -1  # a padded token: skipped
    exp_k, exp_v = case.clone_caches()
    store_kv_ref(case.k, case.v, exp_k, exp_v, slots)
    store_kv_triton(case.k, case.v, case.k_cache, case.v_cache, slots)
    assert torch.equal(case.k_cache, exp_k) and torch.equal(case.v_cache, exp_v)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 4096] if ON_GPU else [64, 96, 1000])
@pytest.mark.parametrize("rows", [1, 7, 300] if ON_GPU else [1, 7])
def test_rms_norm(kernel_device: str, dtype: torch.dtype, hidden: int, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows * hidden)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype).to(kernel_device)
    res = torch.randn(rows, hidden, generator=gen).to(dtype).to(kernel_device)
    w = torch.randn(hidden, generator=gen).to(dtype).to(kernel_device)
    assert_like_eager(rms_norm_triton(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), rms_norm_ref(x.float(), w.float(), 1e-6))
    out, new_res = fused_add_rms_norm_triton(x, res, w, 1e-5)
    ref_out, ref_res = fused_add_rms_norm_ref(x, res, w, 1e-5)
    assert torch.equal(new_res, ref_res)
    assert_like_eager(out, ref_out, rms_norm_ref(ref_res.float(), w.float(), 1e-5))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (16, 8, 128), (4, 2, 16), (6, 2, 64)]
)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("k_shift", [False, True])
def test_rope(
    kernel_device: str,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    qk_norm: bool,
    k_shift: bool,
) -> None:
    """In place, like the reference's rounding; with a K shift (K centering) subtracted
    from the rotated keys only."""
    tokens, max_pos = (257 if ON_GPU else 5), 4096
    gen = torch.Generator().manual_seed(num_heads + head_dim)
    qkv = (
        torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
        .to(dtype)
        .to(kernel_device)
    )
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    v_before = qkv[:, q_size + kv_size :].clone()
    angles = torch.rand(max_pos, head_dim // 2, generator=gen) * 100
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype).to(kernel_device)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype).to(kernel_device)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(kernel_device)
    qw = torch.randn(head_dim, generator=gen).to(dtype).to(kernel_device) if qk_norm else None
    kw = torch.randn(head_dim, generator=gen).to(dtype).to(kernel_device) if qk_norm else None
    shift = (torch.randn(num_kv_heads, head_dim, generator=gen) * 3).to(dtype).to(kernel_device) if k_shift else None
    f32 = [t.float() if t is not None else None for t in (qw, kw)]
    exact_shift = shift.float() if shift is not None else None
    exact_q, exact_k = apply_rope_ref(positions, q.float(), k.float(), cos.float(), sin.float(), *f32, 1e-6, exact_shift)
    ref_q, ref_k = apply_rope_ref(positions, q, k, cos, sin, qw, kw, 1e-6, shift)
    out_q, out_k = apply_rope_triton(positions, q, k, cos, sin, qw, kw, 1e-6, shift)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr(), "not in place"
    assert_like_eager(out_q, ref_q, exact_q)
    assert_like_eager(out_k, ref_k, exact_k)
    assert torch.equal(qkv[:, q_size + kv_size :], v_before), "v was touched"


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(
    ("rows", "inter"), [(1, 14336), (300, 1000), (5, 128)] if ON_GPU else [(1, 1500), (3, 128)]
)
def test_silu_and_mul(kernel_device: str, dtype: torch.dtype, rows: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(rows + inter)
    x = (torch.randn(rows, 2 * inter, generator=gen) * 4).to(dtype).to(kernel_device)
    assert_like_eager(silu_and_mul_triton(x), silu_and_mul_ref(x), silu_and_mul_ref(x.float()))
