"""Attention kernels vs the torch alternatives, Llama-3.1-8B attention shape.

    python bench/attention.py [--out results.json] [--sweep] [--no-flex]
    TRITON_INTERPRET=1 python bench/attention.py --smoke   # CPU: tiny shapes, crash check only

Rows (32 q heads, 8 kv heads, head_dim 128, bf16, block_size 16, shuffled block tables):
- decode at batch 1/16/64/256 x context 1K/4K/16K: the split-KV Triton kernel (KV write
  fused) vs SDPA over the KV gathered out of the paged cache (what a torch-only backend
  does). GB/s counts the K/V bytes that must be read (batch * ctx * 8 * 128 * 2 * 2 B)
  and is compared with the ~3.0 TB/s the H100 reaches on a device-to-device copy.
- prefill of one 4096-token prompt without cached prefix: the Triton extend kernel vs
  SDPA (is_causal; flash with enable_gqa, and each backend pinned) and FlexAttention;
  TFLOP/s counts the causal half (2 * L^2 * D * Hq multiply-adds).
- extend: a 512-token chunk over 4096 cached tokens (batch 1 and 8): the Triton extend
  kernel vs gather + SDPA with a bottom-right causal mask.

Times are triton.testing.do_bench medians (L2 flushed before every run); "graph" rows
replay a CUDA graph of the launch (L2 warm, launch overhead removed). The table is printed
last; --out writes every number as JSON. Runs in well under 3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch
import torch.nn.functional as F

try:
    import rtpllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))

from rtpllm.kernels import decode_attention as decode_mod
from rtpllm.kernels import extend_attention as extend_mod
from rtpllm.kernels._triton import device_sms
from rtpllm.kernels.kv_cache import store_kv_triton

HQ, HKV, D, BLOCK = 32, 8, 128, 16
COPY_BW_GBS = 3000.0  # H100 SXM device-to-device copy, measured (METHOD.md); override with --bw
DT = torch.bfloat16
# Launch configs tried by --sweep: decode (BLOCK_N, warps, stages), prefill (BLOCK_M, BLOCK_N, warps, stages).
DECODE_CONFIGS = ((32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 3))
# (configs that spill registers on sm_90a are left out; see docs/kernels.md)
PREFILL_CONFIGS = (
    (128, 64, 8, 3),
    (128, 32, 8, 3),
    (64, 64, 8, 3),
    (128, 64, 8, 2),
    (128, 64, 8, 4),
    (64, 32, 4, 3),
)


def bench(fn: Callable[[], Any], device: str, graph: bool = False) -> float:
    """Median milliseconds of fn()."""
    if device != "cuda":  # interpreter smoke run: one timed call (nothing to warm up), the number means nothing
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def paged_cache(
    batch: int, ctx: int, device: str, gen: torch.Generator, lens: list[int] | None = None
) -> tuple[torch.Tensor, ...]:
    """A layer's K/V views of a [1, 2, blocks, 16, 8, 128] pool, shuffled block tables,
    and the decode metadata for contexts of `ctx` (the newest token included); `lens`:
    each sequence's own context instead (at most `ctx`)."""
    per_seq = -(-ctx // BLOCK)
    num_blocks = batch * per_seq + 1
    pool = torch.randn(1, 2, num_blocks, BLOCK, HKV, D, device=device, dtype=DT)
    perm = torch.randperm(num_blocks, device="cpu", generator=gen)[: batch * per_seq]
    tables = perm.view(batch, per_seq).to(torch.int32).to(device)
    lengths = torch.tensor(lens if lens is not None else [ctx] * batch, dtype=torch.int64, device=device)
    seq_lens = lengths.to(torch.int32)
    last = lengths - 1
    slots = tables.gather(1, (last // BLOCK).view(-1, 1)).view(-1).long() * BLOCK + last % BLOCK
    return pool[0, 0], pool[0, 1], tables, seq_lens, slots


def decode_case(batch: int, ctx: int, device: str, gen: torch.Generator, free: int) -> dict[str, Any]:
    kc, vc, tables, seq_lens, slots = paged_cache(batch, ctx, device, gen)
    q = torch.randn(batch, HQ, D, device=device, dtype=DT)
    kn = torch.randn(batch, HKV, D, device=device, dtype=DT)
    vn = torch.randn(batch, HKV, D, device=device, dtype=DT)
    out = torch.empty_like(q)
    scale = D**-0.5
    splits = decode_mod.decode_num_splits(batch, HKV, HQ // HKV, ctx)

    def triton_decode() -> None:
        decode_mod.paged_decode_attention_triton(
            q, kn, vn, kc, vc, tables, seq_lens, slots, scale, None, out=out, max_seq_len=ctx
        )

    def sdpa_decode() -> None:
        k = kc[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2)  # [B, Hkv, L, D]
        v = vc[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2)
        F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True)

    kv_bytes = batch * ctx * HKV * D * 2 * 2
    ms = bench(triton_decode, device)
    row: dict[str, Any] = {
        "case": "decode",
        "batch": batch,
        "ctx": ctx,
        "splits": splits,
        "triton_ms": ms,
        "triton_gbs": kv_bytes / ms / 1e6,
    }
    if batch == 1 and device == "cuda":
        row["triton_graph_ms"] = bench(triton_decode, device, graph=True)
    if 3 * kv_bytes < free * 0.8:  # the gather copies the whole context once more
        base = bench(sdpa_decode, device)
        row.update(sdpa_gather_ms=base, sdpa_gather_gbs=kv_bytes / base / 1e6)
    return row


def decode_rows(device: str, smoke: bool, gen: torch.Generator) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    batches, contexts = ([1, 3], [40, 300]) if smoke else ([1, 16, 64, 256], [1024, 4096, 16384])
    for batch in batches:
        for ctx in contexts:
            free = torch.cuda.mem_get_info()[0] if device == "cuda" else 1 << 40
            rows.append(decode_case(batch, ctx, device, gen, free))
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _sdpa_variants(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> dict[str, Callable[[], Any]]:
    """SDPA over [1, H, L, D] inputs: default dispatch with enable_gqa, and each backend pinned
    (those without GQA support get K/V repeated to the q heads first)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    variants: dict[str, Callable[[], Any]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    }
    for name, backend, gqa in (
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION, True),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION, False),
        ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION, False),
    ):

        def run(backend: SDPBackend = backend, gqa: bool = gqa) -> Any:
            with sdpa_kernel(backend):
                if gqa:
                    return F.scaled_dot_product_attention(
                        q, k, v, is_causal=True, scale=scale, enable_gqa=True
                    )
                return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale)

        variants[name] = run
    return variants


def prefill_rows(device: str, smoke: bool, flex: bool, length: int = 4096) -> list[dict[str, Any]]:
    length = 64 if smoke else length
    num_blocks = length // BLOCK + 1
    pool = torch.randn(1, 2, num_blocks, BLOCK, HKV, D, device=device, dtype=DT)
    kc, vc = pool[0, 0], pool[0, 1]
    tables = torch.randperm(num_blocks)[: length // BLOCK].view(1, -1).to(torch.int32).to(device)
    slots = tables[0].long().repeat_interleave(BLOCK) * BLOCK + torch.arange(length, device=device) % BLOCK
    qkv = torch.randn(length, (HQ + 2 * HKV) * D, device=device, dtype=DT)
    q = qkv[:, : HQ * D].view(length, HQ, D)
    k = qkv[:, HQ * D : (HQ + HKV) * D].view(length, HKV, D)
    v = qkv[:, (HQ + HKV) * D :].view(length, HKV, D)
    qsl = torch.tensor([0, length], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([length], dtype=torch.int32, device=device)
    out = torch.empty(length, HQ, D, device=device, dtype=DT)
    scale = D**-0.5
    flops = 2 * length * length * D * HQ  # causal half of 4 * L^2 * D * H
    rows: list[dict[str, Any]] = []

    def add(impl: str, fn: Callable[[], Any]) -> None:
        try:
            ms = bench(fn, device)
        except Exception as exc:  # a backend the build lacks: report, keep going
            rows.append({"case": "prefill", "impl": impl, "tokens": length, "error": repr(exc)[:120]})
            return
        rows.append({"case": "prefill", "impl": impl, "tokens": length, "ms": ms, "tflops": flops / ms / 1e9})

    add(
        "triton_extend",
        lambda: extend_mod.paged_extend_attention_triton(
            q, k, v, kc, vc, tables, qsl, seq_lens, slots, scale, None, length, 0, out
        ),
    )
    add("store_kv", lambda: store_kv_triton(k, v, kc, vc, slots))
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if device == "cuda":
        for name, fn in _sdpa_variants(qt, kt, vt, scale).items():
            add(name, fn)
        if flex:
            add_flex(rows, qt, kt, vt, scale, flops, device)
    return rows


def add_flex(
    rows: list[dict[str, Any]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    flops: int,
    device: str,
) -> None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        length = q.shape[2]
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, length, length, device=device)
        compiled = torch.compile(flex_attention)
        t0 = time.perf_counter()
        compiled(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        ms = bench(lambda: compiled(q, k, v, block_mask=mask, scale=scale, enable_gqa=True), device)
        rows.append(
            {
                "case": "prefill",
                "impl": "flex",
                "tokens": length,
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "compile_s": compile_s,
            }
        )
    except Exception as exc:
        rows.append({"case": "prefill", "impl": "flex", "error": repr(exc)[:120]})


def extend_case(batch: int, chunk: int, prefix: int, device: str, gen: torch.Generator) -> dict[str, Any]:
    ctx = prefix + chunk
    kc, vc, tables, seq_lens, _ = paged_cache(batch, ctx, device, gen)
    pos = torch.arange(prefix, ctx, device=device)
    slots = (tables[:, pos // BLOCK].long() * BLOCK + pos % BLOCK).flatten()
    tokens = batch * chunk
    q = torch.randn(tokens, HQ, D, device=device, dtype=DT)
    k = torch.randn(tokens, HKV, D, device=device, dtype=DT)
    v = torch.randn(tokens, HKV, D, device=device, dtype=DT)
    qsl = torch.arange(0, tokens + 1, chunk, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    scale = D**-0.5
    flops = 4 * batch * chunk * (prefix + chunk / 2) * D * HQ
    group = HQ // HKV

    def triton_extend() -> None:
        extend_mod.paged_extend_attention_triton(
            q, k, v, kc, vc, tables, qsl, seq_lens, slots, scale, None, chunk, 0, out
        )

    def sdpa_extend() -> None:
        # The torch-only way: gather the prefix, append the chunk, mask bottom-right causal.
        kp = kc[tables.long()].flatten(1, 2)[:, :prefix]
        vp = vc[tables.long()].flatten(1, 2)[:, :prefix]
        kk = torch.cat([kp, k.view(batch, chunk, HKV, D)], 1).transpose(1, 2).repeat_interleave(group, 1)
        vv = torch.cat([vp, v.view(batch, chunk, HKV, D)], 1).transpose(1, 2).repeat_interleave(group, 1)
        qq = q.view(batch, chunk, HQ, D).transpose(1, 2)
        allowed = torch.ones(chunk, ctx, dtype=torch.bool, device=device).tril(prefix)
        F.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed, scale=scale)

    ms = bench(triton_extend, device)
    base = bench(sdpa_extend, device)
    return {
        "case": "extend",
        "batch": batch,
        "chunk": chunk,
        "prefix": prefix,
        "triton_ms": ms,
        "triton_tflops": flops / ms / 1e9,
        "sdpa_gather_ms": base,
        "sdpa_gather_tflops": flops / base / 1e9,
    }


def extend_rows(device: str, smoke: bool, gen: torch.Generator, long: bool = False) -> list[dict[str, Any]]:
    """Chunks over a cached prefix (a prefix hit, or chunked prefill): 512 over 4k, and with
    `long` a 4k chunk ending at 16k and 32k tokens."""
    chunk, prefix = (24, 40) if smoke else (512, 4096)
    rows = [extend_case(batch, chunk, prefix, device, gen) for batch in (1, 8)]
    if long and not smoke:
        rows += [extend_case(1, 4096, total - 4096, device, gen) for total in (16384, 32768)]
    return rows


def with_decode_config(cfg: tuple[int, int, int], fn: Callable[[], Any], device: str, nbytes: int) -> dict[str, Any]:
    """{"ms", "gbs"} of fn() with the decode kernel's launch forced to `cfg` (gbs: `nbytes`
    per call), or {"error"} where that launch fails (a config the card cannot run)."""
    decode_mod.CONFIG_OVERRIDE = cfg
    try:
        ms = bench(fn, device)
        return {"ms": ms, "gbs": nbytes / ms / 1e6}
    except Exception as exc:
        return {"error": repr(exc)[:120]}
    finally:
        decode_mod.CONFIG_OVERRIDE = None


def _timing(r: dict[str, Any], ms: str = "{:.4f}") -> str:
    return f"{ms.format(r['ms'])} | {r['gbs']:.0f}" if "ms" in r else f"error {r['error']}"


def _best_verify(r: dict[str, Any]) -> str:
    cfgs = {key: v for key, v in r.items() if key.startswith("verify_ms_")}
    best = min(cfgs, key=cfgs.__getitem__) if cfgs else "-"
    return f"{best} {cfgs.get(best, float('nan')):.3f}"


# (flag, rows function, table header, row line) of each "only:" mode; rows functions are
# defined below and looked up when a mode runs.
ONLY_MODES: list[tuple[str, Callable[[str, bool], list[dict[str, Any]]], str, Callable[[dict[str, Any]], str]]] = [
    ("new_shapes", lambda d, s: new_shape_rows(d, s), "case | len | first call ms | steady ms",
     lambda r: f"{r['case']} | {r['len']} | " + (f"{r['first_ms']:.2f} | {r['ms']:.3f}" if "ms" in r else f"error {r['error']}")),
    ("quant_chunk", lambda d, s: quant_chunk_rows(d, s),
     "chunk over prefix | bf16 extend ms | fp8 extend ms | fp8 SDPA-over-context ms | max |diff|",
     lambda r: f"{r['chunk']} over {r['prefix']} | {r['bf16_extend_ms']:.3f} | {r['quant_extend_ms']:.3f} | "
               f"{r['quant_sdpa_ms']:.3f} | {r['max_abs_diff']:.3g}"),
    ("short_decode", lambda d, s: short_decode_rows(d, s),
     "batch x ctx (mixed: lengths 100..ctx), q heads | cfg (BLOCK_N, warps, stages) | splits | ms | GB/s | default",
     lambda r: f"{r['batch']} x {r['ctx']}{' mixed' if r['mixed_lengths'] else ''}, {r['q_heads']} | {r['cfg']} | "
               f"{r['splits']} | {_timing(r)} | {'*' if r['default'] else ''}"),
    ("verify", lambda d, s: verify_attention_rows(d, s),
     "batch x ctx (k=4) | rows kernel ms | verify kernel ms | plain decode ms | verify GB/s | best verify cfg",
     lambda r: f"{r['batch']} x {r['ctx']} | {r['rows_ms']:.3f} | {r['verify_ms']:.3f} | {r['plain_decode_ms']:.3f} | "
               f"{r['verify_gbs']:.0f} | {_best_verify(r)}"),
    ("quant_prefill", lambda d, s: quant_prefill_rows(d, s), "step | tokens | KV | new tiles | ms | max |diff| vs fused",
     lambda r: f"{r['what']} | {r['tokens']} | {r['fmt']} | "
               f"{'-' if r['fmt'] == 'bf16' else ('stored first' if r['store_first'] else 'fused')} | {r['ms']:.3f} | "
               f"{r.get('max_abs_diff', '')}"),
    ("quant_short_decode", lambda d, s: sorted(quant_short_decode_rows(d, s), key=lambda r: (r["q_heads"], r["fmt"], r.get("ms", 1e9))),
     "batch x ctx (lengths 100..ctx), q heads | KV | cfg | splits | ms | GB/s | default",
     lambda r: f"{r['batch']} x {r['ctx']}, {r['q_heads']} | {r['fmt']} | {r['cfg']} | {r['splits']} | {_timing(r)} | "
               f"{'*' if r.get('default') else ''}"),
    ("scale_layout", lambda d, s: scale_layout_rows(d, s), "batch x ctx | KV | scales | ms | GB/s | max |diff| vs token-major",
     lambda r: f"{r['batch']} x {r['ctx']} | {r['fmt']} | {r['layout']} | {_timing(r)} | {r.get('max_abs_diff', '')}"),
]  # fmt: skip


def write_rows(path: Path | None, device: str, rows: list[dict[str, Any]]) -> None:
    """The rows of an "only:" mode as JSON, with the device they ran on."""
    if path is not None:
        path.write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": rows}, indent=1))


def sweep_rows(device: str, gen: torch.Generator, smoke: bool) -> list[dict[str, Any]]:
    """Decode launch configs (BLOCK_N, num_warps, num_stages) and split counts at a few
    shapes, to pick the defaults."""
    rows: list[dict[str, Any]] = []
    shapes = ((2, 70),) if smoke else ((1, 4096), (64, 4096), (256, 1024))
    for batch, ctx in shapes:
        kc, vc, tables, seq_lens, slots = paged_cache(batch, ctx, device, gen)
        q = torch.randn(batch, HQ, D, device=device, dtype=DT)
        kn = torch.randn(batch, HKV, D, device=device, dtype=DT)
        out = torch.empty_like(q)
        kv_bytes = batch * ctx * HKV * D * 4
        args = (q, kn, kn, kc, vc, tables, seq_lens, slots, D**-0.5, None, out, None, ctx)
        configs = ((32, 4, 2), (64, 4, 2)) if smoke else DECODE_CONFIGS
        for cfg in configs:
            timing = with_decode_config(cfg, lambda: decode_mod.paged_decode_attention_triton(*args), device, kv_bytes)  # noqa: B023
            rows.append({"case": "sweep", "batch": batch, "ctx": ctx, "cfg": cfg, **timing})
    for batch, ctx in ((2, 70),) if smoke else ((1, 4096), (16, 4096), (64, 1024), (64, 4096)):
        kc, vc, tables, seq_lens, slots = paged_cache(batch, ctx, device, gen)
        q = torch.randn(batch, HQ, D, device=device, dtype=DT)
        kn = torch.randn(batch, HKV, D, device=device, dtype=DT)
        out = torch.empty_like(q)
        kv_bytes = batch * ctx * HKV * D * 4
        for splits in (1, 3) if smoke else (1, 2, 4, 8, 16, 32, 64):
            args = (q, kn, kn, kc, vc, tables, seq_lens, slots, D**-0.5, None, out, splits, ctx)
            ms = bench(lambda: decode_mod.paged_decode_attention_triton(*args), device)  # noqa: B023
            rows.append(
                {
                    "case": "sweep_splits",
                    "batch": batch,
                    "ctx": ctx,
                    "splits": splits,
                    "ms": ms,
                    "gbs": kv_bytes / ms / 1e6,
                    "heuristic": decode_mod.decode_num_splits(batch, HKV, HQ // HKV, ctx, device_sms(q)),
                }
            )
    return rows


# --short-decode: the configs above plus deeper pipelines, which a program streaming a
# short context (a few tiles) may need to keep enough loads in flight.
SHORT_DECODE_CONFIGS = DECODE_CONFIGS + ((32, 4, 3), (32, 4, 4), (64, 4, 4), (16, 4, 4))


def short_decode_rows(device: str, smoke: bool) -> list[dict[str, Any]]:
    """The decode kernel where offline runs spend their decode steps: large batches over
    short contexts, for the 8B's 32 query heads and the 0.6B's 16 (8 KV heads both):
    each launch config at the split count the heuristic picks and at 2 and 4. The
    "mixed" rows give the sequences lengths uniform in 100..ctx (seeded), as an offline
    batch has: the longest sequences' programs then set the kernel's tail."""
    gen = torch.Generator().manual_seed(1)
    rows: list[dict[str, Any]] = []
    shapes = (
        ((2, 70, 16, False), (3, 70, 16, True)) if smoke
        else ((256, 512, 32, False), (256, 768, 32, False), (256, 768, 16, False), (128, 1024, 16, False),
              (64, 2048, 32, False), (256, 1300, 16, True), (256, 1300, 32, True))
    )  # fmt: skip
    for batch, ctx, hq, mixed in shapes:
        lens = [int(n) for n in torch.randint(min(100, ctx), ctx + 1, (batch,), generator=gen)] if mixed else None
        kc, vc, tables, seq_lens, slots = paged_cache(batch, ctx, device, gen, lens)
        q = torch.randn(batch, hq, D, device=device, dtype=DT)
        kn = torch.randn(batch, HKV, D, device=device, dtype=DT)
        out = torch.empty_like(q)
        kv_bytes = sum(lens or [ctx] * batch) * HKV * D * 4
        heuristic = decode_mod.decode_num_splits(batch, HKV, hq // HKV, ctx, device_sms(q))
        default_cfg = decode_mod.decode_config(D)
        for cfg in ((32, 4, 2), (64, 4, 2)) if smoke else SHORT_DECODE_CONFIGS:
            for splits in sorted({heuristic, 2, 4}):
                args = (q, kn, kn, kc, vc, tables, seq_lens, slots, D**-0.5, None, out, splits, ctx)
                timing = with_decode_config(cfg, lambda: decode_mod.paged_decode_attention_triton(*args), device, kv_bytes)  # noqa: B023
                rows.append({"case": "short_decode", "batch": batch, "ctx": ctx, "mixed_lengths": mixed, "q_heads": hq, "cfg": cfg,
                             "splits": splits, "default": cfg == default_cfg and splits == heuristic, **timing})  # fmt: skip
    return rows


VERIFY_CONFIGS = ((64, 4, 2), (64, 8, 2), (32, 4, 2), (32, 8, 2), (128, 8, 2))


def verify_attention_rows(device: str, smoke: bool, k: int = 4) -> list[dict[str, Any]]:
    """A speculative verify step's attention, one layer: `batch` sequences of `ctx`
    tokens, each with k + 1 rows ending at its last k + 1 positions. The verify kernel
    (a sequence's KV read once for its rows, default launch and a few others) against
    the decode kernel run row by row (the KV read k + 1 times), and a plain decode step
    of the same sequences (one row each) for scale. GB/s counts the KV bytes a step must
    read at least (each sequence's context once)."""
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(3)
    for batch, ctx in ((2, 40),) if smoke else ((1, 512), (16, 512), (64, 512), (64, 2048), (32, 8192)):
        rows.append(_verify_case(batch, ctx, k, device, gen, smoke))
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _verify_case(batch: int, ctx: int, k: int, device: str, gen: torch.Generator, smoke: bool) -> dict[str, Any]:
    from rtpllm.attention.backend import decode_spans
    from rtpllm.kernels import verify_attention as verify_mod

    kc, vc, tables, _, _ = paged_cache(batch, ctx, device, gen)
    n = k + 1
    row_tables = tables.repeat_interleave(n, 0)
    lens = torch.arange(ctx - k, ctx + 1, dtype=torch.int32, device=device).repeat(batch)
    spans = torch.tensor(decode_spans([n] * batch), dtype=torch.int32, device=device)
    q = torch.randn(batch * n, HQ, D, device=device, dtype=DT)
    out = torch.empty_like(q)
    scale = D**-0.5
    kv_bytes = batch * ctx * HKV * D * 2 * 2

    def per_row() -> None:
        decode_mod.paged_decode_attention_triton(q, None, None, kc, vc, row_tables, lens, None, scale, None, out=out, max_seq_len=ctx)

    def grouped() -> None:
        verify_mod.paged_verify_attention_triton(q, kc, vc, row_tables, lens, spans, scale, n, out=out, max_seq_len=ctx, num_groups=batch)

    def plain() -> None:
        decode_mod.paged_decode_attention_triton(
            q[:batch], None, None, kc, vc, tables, lens[n - 1 :: n], None, scale, None, out=out[:batch], max_seq_len=ctx
        )

    row: dict[str, Any] = {"case": "verify", "batch": batch, "ctx": ctx, "k": k}
    # Both paths compute the same attention; the bench refuses to time a wrong kernel.
    per_row()
    want = out.clone()
    grouped()
    row["max_abs_diff"] = float((out.float() - want.float()).abs().max())
    if row["max_abs_diff"] > 2e-2:
        raise SystemExit(f"verify kernel differs from the row-by-row decode kernel by {row['max_abs_diff']:.3g}")
    for name, fn in (("rows", per_row), ("verify", grouped), ("plain_decode", plain)):
        ms = bench(fn, device)
        row[f"{name}_ms"], row[f"{name}_gbs"] = ms, kv_bytes / ms / 1e6
    for cfg in () if smoke else VERIFY_CONFIGS:
        verify_mod.CONFIG_OVERRIDE = cfg
        try:
            row[f"verify_ms_{cfg[0]}_{cfg[1]}_{cfg[2]}"] = bench(grouped, device)
        finally:
            verify_mod.CONFIG_OVERRIDE = None
    return row


def quant_chunk_rows(device: str, smoke: bool, fmt: str = "fp8") -> list[dict[str, Any]]:
    """A prefill chunk over a cached prefix, one sequence (chunked prefill of a long prompt):
    the bf16 extend kernel, the quantized extend kernel, and SDPA over the context read
    back from the quantized cache and dequantized (the backend's
    QUANT_CHUNK_SDPA_MIN_TOKENS path). TFLOP/s counts the chunk's causal attention."""
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(5)
    for chunk, prefix in ((16, 48),) if smoke else ((512, 4096), (2048, 6144), (2048, 14336), (4096, 12288)):
        rows.append(_quant_chunk_case(chunk, prefix, fmt, device, gen))
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def prefill_step(prefixes: list[int], new: list[int], device: str, gen: torch.Generator) -> tuple[Any, ...]:
    """A prefill step's paged caches (paged_cache) and metadata: sequence i has
    prefixes[i] cached tokens and new[i] new ones, slots at its new positions."""
    from rtpllm.attention.backend import AttentionMetadata

    lens = [p + n for p, n in zip(prefixes, new, strict=True)]
    kc, vc, tables, seq_lens, _ = paged_cache(len(lens), max(lens), device, gen, lens)
    pos = torch.cat([torch.arange(p, p + n) for p, n in zip(prefixes, new, strict=True)]).to(device)
    seq_of = torch.cat([torch.full((n,), i) for i, n in enumerate(new)]).to(device)
    qsl_host = [0, *torch.tensor(new).cumsum(0).tolist()]
    meta = AttentionMetadata(
        slot_mapping=tables[seq_of, pos // BLOCK].long() * BLOCK + pos % BLOCK,
        query_start_loc=torch.tensor(qsl_host, dtype=torch.int32, device=device), seq_lens=seq_lens,
        block_tables=tables, num_decodes=0, max_query_len=max(new), max_seq_len=max(lens), block_size=BLOCK,
        query_start_loc_host=qsl_host, seq_lens_host=lens,
    )  # fmt: skip
    return kc, vc, meta


def _quant_chunk_case(chunk: int, prefix: int, fmt: str, device: str, gen: torch.Generator) -> dict[str, Any]:
    from rtpllm.attention import triton_backend
    from rtpllm.kernels.kv_quant import quantize_ref

    kc, vc, meta = prefill_step([prefix], [chunk], device, gen)
    tables, qsl, seq_lens, slots = meta.block_tables, meta.query_start_loc, meta.seq_lens, meta.slot_mapping
    q = torch.randn(chunk, HQ, D, device=device, dtype=DT)
    k = torch.randn(chunk, HKV, D, device=device, dtype=DT)
    v = torch.randn(chunk, HKV, D, device=device, dtype=DT)
    out = torch.empty_like(q)
    scale = D**-0.5
    kq, ks = quantize_ref(kc, fmt)
    vq, vs = quantize_ref(vc, fmt)
    flops = 4 * chunk * (prefix + chunk / 2) * D * HQ

    def bf16_extend() -> None:
        extend_mod.paged_extend_attention_triton(q, k, v, kc, vc, tables, qsl, seq_lens, slots, scale, None, chunk, 0, out)

    def quant_extend() -> None:
        extend_mod.paged_extend_attention_triton(
            q, k, v, kq, vq, tables, qsl, seq_lens, slots, scale, None, chunk, 0, out, k_scale=ks, v_scale=vs
        )

    def quant_sdpa() -> None:
        triton_backend.TritonAttentionBackend._forward_sdpa(q, k, v, kq, vq, meta, 0, scale, out, ks, vs)

    quant_extend()
    want = out.clone()
    quant_sdpa()
    row: dict[str, Any] = {"case": "quant_chunk", "fmt": fmt, "chunk": chunk, "prefix": prefix}
    row["max_abs_diff"] = float((out.float() - want.float()).abs().max())
    for name, fn in (("bf16_extend", bf16_extend), ("quant_extend", quant_extend), ("quant_sdpa", quant_sdpa)):
        ms = bench(fn, device)
        row[f"{name}_ms"], row[f"{name}_tflops"] = ms, flops / ms / 1e9
    return row


QUANT_DECODE_CONFIGS = tuple((n, w, st) for n in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4))


def quant_sweep_rows(device: str, smoke: bool, fmt: str = "fp8") -> list[dict[str, Any]]:
    """Decode over a quantized cache (1-byte K/V, one fp32 scale per token per KV head) at
    the KV-quantization issue's shape, batch 32 x 16k: every (BLOCK_N, warps, stages) and a
    few split counts, beside the bf16 cache with its default launch."""
    from rtpllm.kernels.kv_quant import storage_dtype

    batch, ctx = (2, 70) if smoke else (32, 16384)
    gen = torch.Generator().manual_seed(7)
    kc, vc, tables, seq_lens, slots = paged_cache(batch, ctx, device, gen)
    q = torch.randn(batch, HQ, D, device=device, dtype=DT)
    kn = torch.randn(batch, HKV, D, device=device, dtype=DT)
    out = torch.empty_like(q)
    rows: list[dict[str, Any]] = []
    ms = bench(lambda: decode_mod.paged_decode_attention_triton(q, kn, kn, kc, vc, tables, seq_lens, slots, D**-0.5, None, out=out, max_seq_len=ctx), device)
    bf16_bytes = batch * ctx * HKV * D * 2 * 2
    rows.append({"case": "quant_sweep", "fmt": "bf16", "cfg": decode_mod.decode_config(D), "ms": ms, "gbs": bf16_bytes / ms / 1e6})
    qk, qv = kc.to(storage_dtype(fmt)), vc.to(storage_dtype(fmt))
    ks = torch.rand(qk.shape[:3], device=device, dtype=torch.float32) / 100
    vs = torch.rand(qk.shape[:3], device=device, dtype=torch.float32) / 100
    q_bytes = batch * ctx * HKV * (D + 4) * 2
    default_splits = decode_mod.decode_num_splits(batch, HKV, HQ // HKV, ctx, device_sms(q))
    for cfg in ((64, 8, 2),) if smoke else QUANT_DECODE_CONFIGS:
        for splits in (default_splits,) if smoke else (default_splits, max(1, default_splits // 2), default_splits * 2):
            timing = with_decode_config(
                cfg,
                lambda: decode_mod.paged_decode_attention_triton(  # noqa: B023
                    q, kn, kn, qk, qv, tables, seq_lens, slots, D**-0.5, None, out=out, num_splits=splits,  # noqa: B023
                    max_seq_len=ctx, k_scale=ks, v_scale=vs,
                ),
                device,
                q_bytes,
            )
            rows.append({"case": "quant_sweep", "fmt": fmt, "cfg": cfg, "splits": splits, **timing})
    return rows


def quant_short_decode_rows(device: str, smoke: bool) -> list[dict[str, Any]]:
    """The quantized decode kernel where offline runs spend their decode steps: 256
    sequences of 100..1,300 tokens (seeded, as an offline batch has), for the 0.6B's 16
    query heads and the 8B's 32 (8 KV heads both). bf16 with its default launch for
    scale; fp8 (loaded as bytes and widened to bf16, or with fp16 dots, and the default:
    widened from 16-bit words into even/odd halves with fp16 dots) and int8 (as bytes,
    and the default halves) at the launches
    that came close in the full sweeps, at the heuristic's split count, and fp8's default
    launch at 2 splits.
    GB/s counts the bytes read: values and scales."""
    from rtpllm.kernels.kv_quant import storage_dtype

    gen = torch.Generator().manual_seed(5)
    rows: list[dict[str, Any]] = []
    shapes = ((3, 70, 16),) if smoke else ((256, 1300, 16), (256, 1300, 32))
    # The launches within ~15% of the best in the full sweeps of 2026-12-07 (H100: every
    # 4- and 8-warp launch of 32-256 tokens, 1-4 stages; 8 warps were 1.3-1.9x slower).
    configs = ((64, 4, 2), (128, 4, 2)) if smoke else ((64, 4, 2), (128, 4, 2), (128, 4, 3), (128, 4, 4), (256, 4, 1))
    default_cfg = decode_mod.decode_config(D, DT, True)
    for batch, ctx, hq in shapes:
        lens = [int(n) for n in torch.randint(min(100, ctx), ctx + 1, (batch,), generator=gen)]
        kc, vc, tables, seq_lens, slots = paged_cache(batch, ctx, device, gen, lens)
        q = torch.randn(batch, hq, D, device=device, dtype=DT)
        kn = torch.randn(batch, HKV, D, device=device, dtype=DT)
        out = torch.empty_like(q)
        tokens = sum(lens)
        heuristic = decode_mod.decode_num_splits(batch, HKV, hq // HKV, ctx, device_sms(q))
        head = {"case": "quant_short_decode", "batch": batch, "ctx": ctx, "q_heads": hq}
        ms = bench(lambda: decode_mod.paged_decode_attention_triton(q, kn, kn, kc, vc, tables, seq_lens, slots, D**-0.5, None, out, heuristic, ctx), device)  # noqa: B023
        rows.append({**head, "fmt": "bf16", "cfg": decode_mod.decode_config(D), "splits": heuristic, "ms": ms, "gbs": tokens * HKV * D * 4 / ms / 1e6})
        order = torch.argsort(seq_lens, descending=True).to(torch.int32)  # rows started longest context first
        ms = bench(lambda: decode_mod.paged_decode_attention_triton(q, kn, kn, kc, vc, tables, seq_lens, slots, D**-0.5, None, out, heuristic, ctx, order=order), device)  # noqa: B023
        rows.append({**head, "fmt": "bf16, longest first", "cfg": decode_mod.decode_config(D), "splits": heuristic, "ms": ms, "gbs": tokens * HKV * D * 4 / ms / 1e6})
        # Widened from 16-bit words into even/odd halves (FP8_WIDEN_PAIRS, INT8_WIDEN_PAIRS:
        # the defaults; inline PTX, interpreted through bit operations on the CPU).
        variants = (("fp8", 0), ("fp8", 1), ("int8", 0), ("fp8", 2), ("int8", 2))
        for fmt, f16 in variants:
            qk, qv = kc.to(storage_dtype(fmt)), vc.to(storage_dtype(fmt))
            ks = torch.rand(qk.shape[:3], device=device) / 100
            vs = torch.rand(qk.shape[:3], device=device) / 100
            runs = [(cfg, heuristic) for cfg in configs] + ([(default_cfg, 2)] if fmt == "fp8" and not f16 else [])
            for cfg, splits in runs:
                def decode(k=qk, v=qv, ks=ks, vs=vs, splits=splits) -> None:
                    decode_mod.paged_decode_attention_triton(
                        q, kn, kn, k, v, tables, seq_lens, slots, D**-0.5, None, out, splits, ctx, k_scale=ks, v_scale=vs  # noqa: B023
                    )  # fmt: skip

                with patch.multiple(decode_mod, FP8_F16_DOTS=f16 > 0, FP8_WIDEN_PAIRS=f16 == 2, INT8_WIDEN_PAIRS=f16 == 2):
                    timing = with_decode_config(cfg, decode, device, tokens * HKV * (D + 4) * 2)
                rows.append({**head, "fmt": fmt + ("", " f16 dots", " f16 halves")[f16], "cfg": cfg, "splits": splits,
                             "default": cfg == default_cfg and splits == heuristic, **timing})  # fmt: skip
            if f16 == 2:
                # The default launch with the rows started longest context first: whether
                # the short rows filling the last wave beat the batch's order.

                def ordered(k=qk, v=qv, ks=ks, vs=vs) -> None:
                    decode_mod.paged_decode_attention_triton(
                        q, kn, kn, k, v, tables, seq_lens, slots, D**-0.5, None, out, heuristic, ctx, k_scale=ks, v_scale=vs, order=order  # noqa: B023
                    )  # fmt: skip

                timing = with_decode_config(default_cfg, ordered, device, tokens * HKV * (D + 4) * 2)
                rows.append({**head, "fmt": fmt + " f16 halves, longest first", "cfg": default_cfg, "splits": heuristic, **timing})
            del qk, qv
    return rows


def quant_prefill_rows(device: str, smoke: bool) -> list[dict[str, Any]]:
    """A prefill step's attention through the backend (its routing, stores and extend
    launch), one layer of the 0.6B shape's heads (16 q, 8 KV of 128): the offline
    workload's step of uncached prompts (14 of 100..1,023 tokens, seeded, all below the
    SDPA threshold), and 8 chunks of 256 over cached prefixes of 512-2,048 (below the
    quantized chunks' SDPA threshold, QUANT_CHUNK_SDPA_MIN_TOKENS). bf16, and fp8 /
    int8 with the fused extend (new tiles quantized in registers) and with
    QUANT_EXTEND_STORE_FIRST (stored first, read back); max |diff| against the fused."""
    from rtpllm.attention import triton_backend
    from rtpllm.kernels.kv_quant import quantize_ref

    gen = torch.Generator().manual_seed(13)
    hq = 16
    cases = (
        (("prompts", [0] * 3, [int(n) for n in torch.randint(20, 60, (3,), generator=gen)]),) if smoke
        else (("prompts", [0] * 14, [int(n) for n in torch.randint(100, 1024, (14,), generator=gen)]),
              ("chunks over prefixes", [512, 1024, 1536, 2048] * 2, [256] * 8))
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    for name, prefixes, new in cases:
        kc, vc, meta = prefill_step(prefixes, new, device, gen)
        t = sum(new)
        q = torch.randn(t, hq, D, device=device, dtype=DT)
        k = torch.randn(t, HKV, D, device=device, dtype=DT)
        v = torch.randn(t, HKV, D, device=device, dtype=DT)
        backend = triton_backend.TritonAttentionBackend(prefill_impl="auto")
        head = {"case": "quant_prefill", "what": name, "tokens": t, "prefixes": prefixes, "new": new}
        ms = bench(lambda: backend.forward(q, k, v, kc, vc, meta, D**-0.5), device)  # noqa: B023
        rows.append({**head, "fmt": "bf16", "ms": ms})
        for fmt in ("fp8",) if smoke else ("fp8", "int8"):
            (kq, ks), (vq, vs) = quantize_ref(kc, fmt), quantize_ref(vc, fmt)
            fused = None
            for store_first in (False, True):
                with patch.object(triton_backend, "QUANT_EXTEND_STORE_FIRST", store_first):
                    got = backend.forward(q, k, v, kq, vq, meta, D**-0.5, None, ks, vs).clone()
                    ms = bench(lambda: backend.forward(q, k, v, kq, vq, meta, D**-0.5, None, ks, vs), device)  # noqa: B023
                fused = got if fused is None else fused
                diff = float((got.float() - fused.float()).abs().max())
                rows.append({**head, "fmt": fmt, "store_first": store_first, "ms": ms, "max_abs_diff": diff})
    return rows


def scale_layout_rows(device: str, smoke: bool) -> list[dict[str, Any]]:
    """Decode over a quantized cache with its per-token scales laid out two ways: as the
    pool holds them today, token-major ([blocks, 16 tokens, 8 KV heads]: one program's
    16 scales of a block sit 32 bytes apart, every 128-byte line of the block's 512
    touched), and head-major (a head's 16 scales in 64 contiguous bytes), beside bf16,
    each with its default launch and split count. The 8B shape at batch 32 x 16k (the
    KV-quantization issue's) and batch 256 x 1024; GB/s count K, V and scale bytes."""
    rows: list[dict[str, Any]] = []
    for batch, ctx in ((2, 70),) if smoke else ((32, 16384), (256, 1024)):
        rows += _scale_layout_case(batch, ctx, device, ("fp8",) if smoke else ("fp8", "int8"))
    return rows


def _scale_layout_case(batch: int, ctx: int, device: str, formats: tuple[str, ...]) -> list[dict[str, Any]]:
    from rtpllm.kernels.kv_quant import storage_dtype

    kc, vc, tables, seq_lens, slots = paged_cache(batch, ctx, device, torch.Generator().manual_seed(11))
    q = torch.randn(batch, HQ, D, device=device, dtype=DT)
    kn = torch.randn(batch, HKV, D, device=device, dtype=DT)
    out = torch.empty_like(q)

    def decode(k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
        decode_mod.paged_decode_attention_triton(
            q, kn, kn, k, v, tables, seq_lens, slots, D**-0.5, None, out=out, max_seq_len=ctx, **kw
        )  # fmt: skip
        return out

    ms = bench(lambda: decode(kc, vc), device)
    rows = [{"batch": batch, "ctx": ctx, "fmt": "bf16", "layout": "-", "ms": ms, "gbs": batch * ctx * HKV * D * 4 / ms / 1e6}]
    for fmt in formats:
        qk, qv = kc.to(storage_dtype(fmt)), vc.to(storage_dtype(fmt))
        token_major = [torch.rand(qk.shape[:3], device=device) / 100 for _ in range(2)]
        head_major = []
        for t in token_major:
            h = torch.empty(t.shape[0], t.shape[2], t.shape[1], device=device).transpose(1, 2)
            head_major.append(h.copy_(t))
        outs = {}
        # fp8 also with its dots in fp16 (decode_attention.FP8_F16_DOTS).
        variants = [("token-major", token_major, False), ("head-major", head_major, False)]
        if fmt == "fp8":
            variants += [("token-major, fp16 dots", token_major, True), ("head-major, fp16 dots", head_major, True)]
        for layout, (ks, vs), f16 in variants:
            # Tiles loaded whole, as measured then.
            with patch.multiple(decode_mod, FP8_F16_DOTS=f16, FP8_WIDEN_PAIRS=False):
                outs[layout] = decode(qk, qv, k_scale=ks, v_scale=vs).clone()
                ms = bench(lambda k=qk, v=qv, ks=ks, vs=vs: decode(k, v, k_scale=ks, v_scale=vs), device)
            diff = float((outs[layout].float() - outs["token-major"].float()).abs().max())
            rows.append({"batch": batch, "ctx": ctx, "fmt": fmt, "layout": layout, "ms": ms, "gbs": batch * ctx * HKV * (D + 4) * 2 / ms / 1e6, "max_abs_diff": diff})
    return rows


def prefill_sweep_rows(device: str, smoke: bool) -> list[dict[str, Any]]:
    """Extend-kernel launch configs on the 4096-token prefill."""
    length = 64 if smoke else 4096
    num_blocks = length // BLOCK + 1
    pool = torch.randn(1, 2, num_blocks, BLOCK, HKV, D, device=device, dtype=DT)
    tables = torch.arange(length // BLOCK, dtype=torch.int32, device=device).view(1, -1)
    slots = torch.arange(length, device=device)
    q = torch.randn(length, HQ, D, device=device, dtype=DT)
    k = torch.randn(length, HKV, D, device=device, dtype=DT)
    qsl = torch.tensor([0, length], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([length], dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    flops = 2 * length * length * D * HQ
    rows: list[dict[str, Any]] = []
    for cfg in ((64, 32, 4, 2),) if smoke else PREFILL_CONFIGS:
        extend_mod.CONFIG_OVERRIDE = cfg
        try:
            ms = bench(
                lambda: extend_mod.paged_extend_attention_triton(
                    q,
                    k,
                    k,
                    pool[0, 0],
                    pool[0, 1],
                    tables,
                    qsl,
                    seq_lens,
                    slots,
                    D**-0.5,
                    None,
                    length,
                    0,
                    out,
                ),
                device,
            )
            rows.append({"case": "sweep_prefill", "cfg": cfg, "ms": ms, "tflops": flops / ms / 1e9})
        except Exception as exc:
            rows.append({"case": "sweep_prefill", "cfg": cfg, "error": repr(exc)[:120]})
        finally:
            extend_mod.CONFIG_OVERRIDE = None
    return rows


def new_shape_rows(device: str, smoke: bool) -> list[dict[str, Any]]:
    """What a new sequence length costs SDPA: the first call at each of a series of
    lengths never seen before in this process (sync, call, sync: any per-shape plan or
    graph build lands here) against the same call's steady time. Rows: the prompt's
    causal SDPA (8B shape) at the exact length and padded to buckets (`causal_sdpa`, as
    the backend runs it; then 3 tokens shorter, in the buckets already built), and a
    vision encoder's non-causal SDPA (Qwen2-VL ViT: 16 heads of 80, two images of the
    length in one call) by default dispatch and with each backend pinned."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from rtpllm.attention.triton_backend import SDPA_LEN_BUCKETS_PER_OCTAVE, causal_sdpa

    lengths = (70, 130) if smoke else (517, 733, 1021, 1499, 2011, 3001, 4093, 5417)
    pinned = {
        "default": None,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }

    def timed_first(fn: Callable[[], Any]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    # (name, the call at a length, how much shorter than the listed lengths)
    cases: list[tuple[str, Callable[[int], Callable[[], Any]], int]] = []
    for name, per_octave, shorter in (
        ("causal_exact", None, 0),
        ("causal_bucketed", SDPA_LEN_BUCKETS_PER_OCTAVE, 0),
        ("causal_bucketed_again", SDPA_LEN_BUCKETS_PER_OCTAVE, 3),  # buckets already built
    ):

        def prompt(n: int, per_octave: int | None = per_octave) -> Callable[[], Any]:
            q = torch.randn(1, HQ, n, D, device=device, dtype=DT)
            k, v = (torch.randn(1, HKV, n, D, device=device, dtype=DT) for _ in range(2))
            return lambda: causal_sdpa(q, k, v, D**-0.5, per_octave)

        cases.append((name, prompt, shorter))
    for name, backend in pinned.items():

        def vision(n: int, backend: SDPBackend | None = backend) -> Callable[[], Any]:
            q, k, v = (torch.randn(2, 16, n, 80, device=device, dtype=DT) for _ in range(3))
            if backend is None:
                return lambda: F.scaled_dot_product_attention(q, k, v)

            def run() -> Any:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)

            return run

        cases.append((f"vision_{name}", vision, 0))
    rows: list[dict[str, Any]] = []
    for name, make, shorter in cases:
        for n in (length - shorter for length in lengths):
            fn = make(n)
            try:
                first = timed_first(fn)
                rows.append({"case": name, "len": n, "first_ms": first, "ms": bench(fn, device)})
            except Exception as exc:  # a pinned backend may not take the shape
                rows.append({"case": name, "len": n, "error": repr(exc)[:120]})
    return rows


def table(rows: list[dict[str, Any]], bw: float) -> str:
    lines = [
        "",
        f"decode (KV GB/s; copy bandwidth {bw:.0f} GB/s)",
        f"{'batch':>5} {'ctx':>6} {'splits':>6} {'triton ms':>10} {'GB/s':>7} {'%bw':>5} "
        f"{'sdpa+gather ms':>15} {'GB/s':>7} {'speedup':>7} {'graph ms':>9}",
    ]
    for r in rows:
        if r["case"] != "decode":
            continue
        base = r.get("sdpa_gather_ms")
        lines.append(
            f"{r['batch']:>5} {r['ctx']:>6} {r['splits']:>6} {r['triton_ms']:>10.4f} {r['triton_gbs']:>7.0f} "
            f"{100 * r['triton_gbs'] / bw:>5.1f} "
            + (
                f"{base:>15.4f} {r['sdpa_gather_gbs']:>7.0f} {base / r['triton_ms']:>7.2f}"
                if base
                else f"{'-':>31}"
            )
            + (f" {r['triton_graph_ms']:>9.4f}" if "triton_graph_ms" in r else "")
        )
    lines += [
        "",
        "prefill, one prompt, no cached prefix",
        f"{'impl':>15} {'tokens':>6} {'ms':>9} {'TFLOP/s':>8}",
    ]
    for r in rows:
        if r["case"] == "prefill":
            if "error" in r:
                lines.append(f"{r['impl']:>15} {'':>6} error: {r['error']}")
            else:
                lines.append(f"{r['impl']:>15} {r['tokens']:>6} {r['ms']:>9.3f} {r['tflops']:>8.1f}")
    lines += [
        "",
        "extend (chunk over cached prefix)",
        f"{'batch':>5} {'chunk':>6} {'prefix':>6} {'triton ms':>10} {'TFLOP/s':>8} {'sdpa+gather ms':>15} {'speedup':>7}",
    ]
    for r in rows:
        if r["case"] == "extend":
            lines.append(
                f"{r['batch']:>5} {r['chunk']:>6} {r['prefix']:>6} {r['triton_ms']:>10.3f} {r['triton_tflops']:>8.1f} "
                f"{r['sdpa_gather_ms']:>15.3f} {r['sdpa_gather_ms'] / r['triton_ms']:>7.2f}"
            )
    sweep = [r for r in rows if r["case"] == "sweep" and "ms" in r]
    if sweep:
        lines += ["", "decode config sweep (BLOCK_N, warps, stages)"]
        for r in sweep:
            lines.append(
                f"{r['batch']:>5} {r['ctx']:>6} {r['cfg']!s:>14} {r['ms']:>9.4f} ms {r['gbs']:>7.0f} GB/s"
            )
    for r in rows:
        if r["case"] == "sweep_splits":
            lines.append(
                f"decode splits {r['batch']:>4} x {r['ctx']:>5}: splits {r['splits']:>3} {r['ms']:>9.4f} ms "
                f"{r['gbs']:>7.0f} GB/s (heuristic picks {r['heuristic']})"
            )
    for r in rows:
        if r["case"] == "sweep_prefill":
            res = f"{r['ms']:>9.3f} ms {r['tflops']:>6.1f} TFLOP/s" if "ms" in r else f"error: {r['error']}"
            lines.append(f"prefill cfg (BLOCK_M, BLOCK_N, warps, stages) {r['cfg']!s:>16} {res}")
    for tokens in sorted({r["tokens"] for r in rows if r["case"] == "prefill" and "ms" in r}):
        prefill = {r["impl"]: r["ms"] for r in rows if r["case"] == "prefill" and "ms" in r and r["tokens"] == tokens}
        if "triton_extend" in prefill:
            best = min((v, k) for k, v in prefill.items() if k != "store_kv")
            lines.append(
                f"fastest prefill of {tokens}: {best[1]} ({best[0]:.3f} ms); triton_extend {prefill['triton_extend']:.3f} ms"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter crash check)")
    parser.add_argument("--out", type=Path, default=None, help="write all rows as JSON here")
    parser.add_argument("--sweep", action="store_true", help="also sweep decode launch configs")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes ~30 s)")
    parser.add_argument(
        "--prefill-lens", type=int, nargs="+", default=[4096], help="uncached prompt lengths for the prefill rows"
    )
    parser.add_argument("--quant-sweep", action="store_true", help="only: decode launch configs over an fp8 cache at batch 32 x 16k")
    parser.add_argument("--quant-prefill", action="store_true", help="only: a prefill step's attention over bf16 / fp8 / int8 caches, new tiles fused or stored first")
    parser.add_argument("--quant-short-decode", action="store_true", help="only: quantized decode launch configs at batch 256 over 100..1,300-token contexts (the offline workloads' decode)")
    parser.add_argument("--scale-layout", action="store_true", help="only: decode over fp8/int8 caches with token-major and head-major scales")
    parser.add_argument("--long", action="store_true", help="also 4k-token chunks over 12k and 28k cached tokens")
    parser.add_argument("--verify", action="store_true", help="only: a speculative verify step's attention, verify kernel vs row by row")
    parser.add_argument("--quant-chunk", action="store_true", help="only: a chunk over a cached prefix, quantized extend kernel vs SDPA over the dequantized context")
    parser.add_argument("--short-decode", action="store_true", help="only: decode launch configs and splits at large batches over short contexts")
    parser.add_argument("--new-shapes", action="store_true", help="only: SDPA's first call at lengths new to the process against its steady time (prompt causal, vision non-causal)")
    parser.add_argument("--bw", type=float, default=COPY_BW_GBS, help="copy bandwidth to compare with, GB/s")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke under TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    started = time.perf_counter()
    # The "only:" modes: each prints its rows as a table and writes them as JSON.
    for flag, rows_fn, header, line in ONLY_MODES:
        if getattr(args, flag):
            rows = rows_fn(device, args.smoke)
            print(header)
            for r in rows:
                print(line(r))
            write_rows(args.out, device, rows)
            return
    if args.quant_sweep:
        rows = quant_sweep_rows(device, args.smoke)
        good = sorted((r for r in rows if "ms" in r and r["fmt"] != "bf16"), key=lambda r: r["ms"])
        for r in [rows[0], *good]:
            print(f"{r['fmt']:>5} cfg {r['cfg']!s:>14} splits {r.get('splits', '-')!s:>3} {r['ms']:>8.3f} ms {r['gbs']:>6.0f} GB/s")
        print(f"default quantized cfg {decode_mod.decode_config(D, DT, True)}")
        if args.out:
            args.out.write_text(json.dumps({"rows": rows}, indent=1))
        return
    rows = decode_rows(device, args.smoke, gen)
    for length in args.prefill_lens:
        rows += prefill_rows(device, args.smoke, flex=not args.no_flex and not args.smoke, length=length)
    rows += extend_rows(device, args.smoke, gen, long=args.long)
    if args.sweep:
        rows += sweep_rows(device, gen, args.smoke)
        rows += prefill_sweep_rows(device, args.smoke)
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
        "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "block_size": BLOCK, "dtype": "bf16"},
    }
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"{meta['device']}, torch {meta['torch']}, {meta['seconds']:.0f} s")
    print(table(rows, args.bw))
    if math.isnan(sum(r.get("ms", 0.0) for r in rows)):
        sys.exit(1)


if __name__ == "__main__":
    main()
