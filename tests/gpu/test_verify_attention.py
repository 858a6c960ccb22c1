"""The verify-attention kernel (a sequence's verify rows read its KV once) against the
torch reference on random paged caches: plain, sliding-window and quantized, mixed group
sizes with plain decode rows among them, rows in any order within a group, and split
counts from one to several (partitions in which some rows have no key yet).

On a GPU at realistic shapes; on the CPU under TRITON_INTERPRET=1 at small ones.
"""

from __future__ import annotations

import pytest
import torch
from gpu_env import ON_GPU
from paged_cases import TOLERANCE, make_case, rel_err

from rtpllm.attention.backend import decode_spans
from rtpllm.kernels.kv_quant import quantize_ref, storage_dtype
from rtpllm.kernels.verify_attention import (
    paged_verify_attention_ref,
    paged_verify_attention_triton,
    verify_fits,
    verify_tile_rows,
)

pytestmark = pytest.mark.gpu


def verify_case(
    contexts: list[int],
    groups: list[int],
    heads: tuple[int, int],
    dtype: torch.dtype,
    device: str,
    seed: int,
    reverse: bool = False,
    block_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Sequence i ends at contexts[i] with its last groups[i] positions as rows (row j's
    seq_len is contexts[i] - groups[i] + j + 1); every row's K/V is in the cache, as
    the backend stores them before attending. `reverse`: a group's rows in reverse."""
    num_heads, num_kv = heads
    case = make_case(contexts, [1] * len(contexts), num_heads, num_kv, 64, block_size, dtype, device, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    rows = sum(groups)
    q = torch.randn(rows, num_heads, 64, generator=gen, device=device, dtype=dtype)
    lens: list[int] = []
    table_rows: list[int] = []
    for i, (ctx, n) in enumerate(zip(contexts, groups, strict=True)):
        own = [ctx - n + j + 1 for j in range(n)]
        lens.extend(reversed(own) if reverse else own)
        table_rows.extend([i] * n)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    tables = case.meta.block_tables[torch.tensor(table_rows, device=device)].contiguous()
    spans = torch.tensor(decode_spans(groups), dtype=torch.int32, device=device)
    return q, case.k_cache, case.v_cache, tables, seq_lens, spans, case.scale


SHAPES = [(8, 2), (4, 4), (32, 8)] if ON_GPU else [(8, 2), (4, 4)]


@pytest.mark.parametrize("heads", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 23])
def test_verify_equals_reference(kernel_device: str, heads: tuple[int, int], dtype: torch.dtype, window: int | None) -> None:
    big = 3000 if ON_GPU else 90
    contexts = [12, big, 33, 5, 70]
    groups = [1, 5, 3, 5, 1]  # plain decodes among groups; one group as long as its context
    q, kc, vc, tables, lens, spans, scale = verify_case(contexts, groups, heads, dtype, kernel_device, seed=3)
    ref = paged_verify_attention_ref(q.float(), kc.float(), vc.float(), tables, lens, spans, scale, 5, window)
    for splits in (1, 3, None):
        out = torch.full_like(q, float("nan"))
        paged_verify_attention_triton(
            q, kc, vc, tables, lens, spans, scale, 5, window, out=out, num_splits=splits, num_groups=len(groups)
        )
        err = rel_err(out, ref)
        assert err < TOLERANCE[dtype], f"splits={splits}: rel err {err:.2e}"


def test_rows_in_any_order_within_a_group(kernel_device: str) -> None:
    q, kc, vc, tables, lens, spans, scale = verify_case([40, 64], [4, 2], (8, 2), torch.float32, kernel_device, 4, reverse=True)
    ref = paged_verify_attention_ref(q, kc, vc, tables, lens, spans, scale, 4)
    out = paged_verify_attention_triton(q, kc, vc, tables, lens, spans, scale, 4, num_splits=2)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_verify_quantized_cache(kernel_device: str, fmt: str) -> None:
    """A quantized cache is attended as its dequantized contents (the reference)."""
    q, kc, vc, tables, lens, spans, scale = verify_case([50, 21], [5, 3], (8, 2), torch.bfloat16, kernel_device, 5)
    kq, ks = quantize_ref(kc, fmt)
    vq, vs = quantize_ref(vc, fmt)
    assert kq.dtype == storage_dtype(fmt)
    ref = paged_verify_attention_ref(q.float(), kq, vq, tables, lens, spans, scale, 5, k_scale=ks, v_scale=vs)
    for splits in (1, 2):
        out = paged_verify_attention_triton(q, kq, vq, tables, lens, spans, scale, 5, num_splits=splits, k_scale=ks, v_scale=vs)
        err = rel_err(out, ref)
        assert err < TOLERANCE[torch.bfloat16], f"splits={splits}: rel err {err:.2e}"


def test_padded_rows_of_a_graph_write_their_own_rows_only(kernel_device: str) -> None:
    """A captured graph's padding rows (span 1, seq_len 1 on a scratch block) leave the
    real rows' results as without them."""
    q, kc, vc, tables, lens, spans, scale = verify_case([30, 47], [3, 4], (8, 2), torch.float32, kernel_device, 6)
    ref = paged_verify_attention_ref(q, kc, vc, tables, lens, spans, scale, 4)
    pad = 3
    q2 = torch.cat([q, torch.randn(pad, *q.shape[1:], device=q.device)])
    lens2 = torch.cat([lens, torch.ones(pad, dtype=torch.int32, device=q.device)])
    tables2 = torch.cat([tables, torch.zeros(pad, tables.shape[1], dtype=tables.dtype, device=q.device)])
    spans2 = torch.cat([spans, torch.ones(pad, dtype=torch.int32, device=q.device)])
    out = paged_verify_attention_triton(q2, kc, vc, tables2, lens2, spans2, scale, 4, num_splits=2)
    assert rel_err(out[: len(q)], ref) < TOLERANCE[torch.float32]


def test_tile_bounds() -> None:
    assert verify_tile_rows(4, 5) == 32  # the 8B shape at k = 4: 8 row slots x 4 heads
    assert verify_tile_rows(1, 1) == 16
    assert verify_fits(32, 8, 8) and not verify_fits(64, 2, 8)
    assert decode_spans([3, 1, 2]) == [3, 0, 0, 1, 2, 0]


def test_rows_far_apart_with_a_window(kernel_device: str) -> None:
    """Rows of one group may end far apart: with a sliding window, the later row has no key
    in the partition's first tiles and must still come out exact (no NaN carried)."""
    q, kc, vc, tables, _, _, scale = verify_case([200], [2], (8, 2), torch.float32, kernel_device, 7)
    lens = torch.tensor([10, 200], dtype=torch.int32, device=q.device)
    spans = torch.tensor([2, 0], dtype=torch.int32, device=q.device)
    ref = paged_verify_attention_ref(q, kc, vc, tables, lens, spans, scale, 2, 20)
    out = paged_verify_attention_triton(q, kc, vc, tables, lens, spans, scale, 2, 20, num_splits=1)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_bench_verify_rows_run(kernel_device: str) -> None:
    """bench/attention.py --verify: the kernels it times agree with each other (smoke
    shape off the GPU, where the timings mean nothing)."""
    from bench import attention

    if kernel_device != "cpu":
        pytest.skip("the GPU runs the bench itself (bench/gpu_session.sh verifyattn)")
    (row,) = attention.verify_attention_rows(kernel_device, smoke=True)
    assert row["batch"] == 2 and row["rows_ms"] > 0 and row["verify_ms"] > 0 and row["plain_decode_ms"] > 0
    assert row["max_abs_diff"] < 2e-2
