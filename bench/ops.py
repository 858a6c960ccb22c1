"""Fused small ops (Triton) vs the eager torch they replace, Llama-3.1-8B shapes, bf16;
and the small-batch GEMV kernel vs cuBLAS on the model's linear layers.

    python bench/ops.py [--out results.json]     # small ops, then GEMV (chosen config only)
    python bench/ops.py --gemv-only              # GEMV with the candidate-config sweep
    TRITON_INTERPRET=1 python bench/ops.py --smoke [--gemv-only]   # CPU: crash check only

Small ops: per op and token count (1 = batch-1 decode, 256 = large decode batch, 4096 =
prefill): median time of the Triton kernel and of the eager reference, and the Triton
kernel's GB/s over the bytes it must move (each input read once, each output written
once). At 1 token both are launch-bound: the eager versions launch ~5-10 kernels each, the
fused ones one. Runs in well under a minute on an H100.

GEMV: y = x @ W.T for the 8B weights (qkv 6144x4096, o 4096x4096, gate_up 28672x4096,
down 4096x14336, lm_head 128256x4096) at M = 1, 4, 8 tokens: cuBLAS (F.linear), the
kernel with the config `gemv_config` picks, and with --gemv-only every candidate config.
Each time is one call's share of a CUDA graph of back-to-back calls (as decode runs them:
no launch overhead between kernels) that cycle over enough copies of W (>= 256 MB) that
W comes from DRAM, not the 50 MB L2. GB/s = weight bytes / time, also as % of the copy
bandwidth (--copy-gbs, 3030 = H100 SXM measured). It prints the best config per shape
in CONFIG_TABLE form, where the kernel beats cuBLAS per M next to what `linear` routes to it
(GEMV_MAX_N* in libs/rtpllm/kernels/gemv.py), and the batch-1 decode time of the linear
layers per token with each. --gemv-only takes about 3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import rtpllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))

from rtpllm.kernels import gemv as gemv_mod
from rtpllm.kernels.activation import silu_and_mul_ref, silu_and_mul_triton
from rtpllm.kernels.kv_cache import store_kv_ref, store_kv_triton
from rtpllm.kernels.rmsnorm import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)
from rtpllm.kernels.rope import apply_rope_ref, apply_rope_triton

HIDDEN, INTER, HQ, HKV, D = 4096, 14336, 32, 8, 128
DT = torch.bfloat16


def bench(fn: Callable[[], Any], device: str) -> float:
    """Median milliseconds of fn()."""
    if device != "cuda":
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def op_cases(tokens: int, device: str) -> list[tuple[str, int, Callable[[], Any], Callable[[], Any]]]:
    """(name, bytes moved, triton fn, eager fn) for one token count."""
    e = torch.empty((), dtype=DT).element_size()
    x = torch.randn(tokens, HIDDEN, device=device, dtype=DT)
    res = torch.randn(tokens, HIDDEN, device=device, dtype=DT)
    w = torch.randn(HIDDEN, device=device, dtype=DT)
    gate_up = torch.randn(tokens, 2 * INTER, device=device, dtype=DT)
    qkv = torch.randn(tokens, (HQ + 2 * HKV) * D, device=device, dtype=DT)
    q = qkv[:, : HQ * D].view(tokens, HQ, D)
    k = qkv[:, HQ * D : (HQ + HKV) * D].view(tokens, HKV, D)
    v = qkv[:, (HQ + HKV) * D :].view(tokens, HKV, D)
    # Unit rotations, so repeating the in-place kernel keeps q/k bounded.
    angles = torch.rand(8192, D // 2, device=device) * 6.3
    cos = angles.cos().repeat(1, 2).to(DT)
    sin = angles.sin().repeat(1, 2).to(DT)
    pos = torch.randint(0, 8192, (tokens,), device=device)
    qn = torch.randn(D, device=device, dtype=DT)
    kn = torch.randn(D, device=device, dtype=DT)
    blocks = tokens // 16 + 2
    pool = torch.randn(1, 2, blocks, 16, HKV, D, device=device, dtype=DT)
    slots = torch.randperm(blocks * 16, device=device)[:tokens]
    qk_bytes = 2 * tokens * (HQ + HKV) * D * e
    return [
        (
            "rms_norm",
            2 * tokens * HIDDEN * e,
            lambda: rms_norm_triton(x, w, 1e-5),
            lambda: rms_norm_ref(x, w, 1e-5),
        ),
        (
            "add_rms_norm",
            4 * tokens * HIDDEN * e,
            lambda: fused_add_rms_norm_triton(x, res, w, 1e-5),
            lambda: fused_add_rms_norm_ref(x, res, w, 1e-5),
        ),
        (
            "rope",
            qk_bytes,
            lambda: apply_rope_triton(pos, q, k, cos, sin),
            lambda: apply_rope_ref(pos, q, k, cos, sin),
        ),
        (
            "rope+qk_norm",
            qk_bytes,
            lambda: apply_rope_triton(pos, q, k, cos, sin, qn, kn, 1e-6),
            lambda: apply_rope_ref(pos, q, k, cos, sin, qn, kn, 1e-6),
        ),
        (
            "silu_and_mul",
            3 * tokens * INTER * e,
            lambda: silu_and_mul_triton(gate_up),
            lambda: silu_and_mul_ref(gate_up),
        ),
        (
            "store_kv",
            4 * tokens * HKV * D * e,
            lambda: store_kv_triton(k, v, pool[0, 0], pool[0, 1], slots),
            lambda: store_kv_ref(k, v, pool[0, 0], pool[0, 1], slots),
        ),
    ]


# ----------------------------------------------------------------------------- GEMV

# (N, K) of the 8B weights; --smoke uses small stand-ins with the same code paths.
GEMV_WEIGHTS = {
    "qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
SMOKE_WEIGHTS = {"qkv": (96, 64), "o_proj": (64, 64), "gate_up": (224, 64), "down": (64, 224), "lm_head": (500, 64)}
GEMV_TOKENS = (1, 4, 8)
COPY_GBS = 3030.0  # H100 SXM device-to-device copy (the measurement); --copy-gbs
L2_FLUSH_BYTES = 256 << 20  # W copies per graph total at least this: reads come from DRAM


def graph_call_us(fn: Callable[[torch.Tensor], Any], weights: list[torch.Tensor], calls: int) -> float:
    """Microseconds per call of fn inside one CUDA graph of `calls` back-to-back calls over
    the weight copies in turn (median of 5 replays)."""
    for w in weights:  # compile, allocate the split-K counters, warm cuBLAS
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return 1e3 * sorted(times)[2] / calls


def gemv_impls(m: int, n: int, k: int, sweep: bool, device: str) -> list[tuple[str, gemv_mod.GemvConfig | None]]:
    """(label, config) to time: cuBLAS (None), the chosen config, and with `sweep` the
    candidates of its path (PDL ones only on sm_90+)."""
    chosen = gemv_mod.gemv_config(m, n, k)
    impls: list[tuple[str, gemv_mod.GemvConfig | None]] = [("cuBLAS", None), (f"{chosen} *", chosen)]
    if sweep:
        pdl_ok = device == "cuda" and torch.cuda.get_device_capability()[0] >= 9
        candidates = gemv_mod.FMA_CANDIDATES if m == 1 else gemv_mod.DOT_CANDIDATES
        for cfg in candidates:
            if cfg != chosen and (cfg.dot or m == 1) and (pdl_ok or not cfg.pdl):
                impls.append((str(cfg), cfg))
    return impls


def gemv_rows(device: str, smoke: bool, sweep: bool) -> list[dict[str, Any]]:
    """Time every (weight, tokens, impl); check each kernel result against cuBLAS."""
    rows: list[dict[str, Any]] = []
    for name, (n, k) in (SMOKE_WEIGHTS if smoke else GEMV_WEIGHTS).items():
        nbytes = n * k * DT.itemsize
        copies = 1 if smoke else max(1, -(-L2_FLUSH_BYTES // nbytes))
        weights = [(torch.randn(n, k, device=device) * k**-0.5).to(DT) for _ in range(copies)]
        # ~20 ms per replay at copy bandwidth, 20..400 calls.
        calls = min(400, max(20, int(20e-3 / (nbytes / (COPY_GBS * 1e9)))))
        for m in (1, 4) if smoke else GEMV_TOKENS:
            x = torch.randn(m, k, device=device, dtype=DT)
            want = torch.nn.functional.linear(x, weights[0])
            for label, cfg in gemv_impls(m, n, k, sweep, device):
                if cfg is None:
                    fn: Callable[[torch.Tensor], Any] = lambda w, x=x: torch.nn.functional.linear(x, w)  # noqa: E731
                else:
                    fn = lambda w, x=x, cfg=cfg: gemv_mod.gemv_triton(x, w, config=cfg)  # noqa: E731
                err = ((fn(weights[0]).float() - want.float()).norm() / want.float().norm()).item()
                if device == "cuda":
                    us = graph_call_us(fn, weights, calls)
                else:
                    us = 1e3 * bench(lambda fn=fn, w=weights[0]: fn(w), device)
                rows.append(
                    {
                        "op": f"gemv_{name}",
                        "n": n,
                        "k": k,
                        "tokens": m,
                        "impl": label,
                        "config": repr(cfg) if cfg is not None else None,
                        "us": us,
                        "gbs": nbytes / us / 1e3,
                        "rel_err_vs_cublas": err,
                    }
                )
            torch.cuda.empty_cache() if device == "cuda" else None
        del weights
    return rows


def print_gemv(rows: list[dict[str, Any]], copy_gbs: float) -> None:
    print(
        f"\nGEMV y = x @ W.T, bf16: time per call inside a CUDA graph, W cycled over copies >= "
        f"{L2_FLUSH_BYTES >> 20} MB; % of {copy_gbs:.0f} GB/s copy bandwidth; * = config gemv_config picks"
    )
    print(f"{'weight':>8} {'N x K':>12} {'M':>2} {'impl':<40} {'us':>8} {'GB/s':>6} {'%copy':>6} {'vs cuBLAS':>9}")
    base: dict[tuple[str, int], float] = {}
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        key = (r["op"], r["tokens"])
        if r["config"] is None:
            base[key] = r["us"]
        elif key not in best or r["us"] < best[key]["us"]:
            best[key] = r
        bad = "  WRONG" if r["rel_err_vs_cublas"] > 1e-2 else ""
        print(
            f"{r['op'][5:]:>8} {str(r['n']) + 'x' + str(r['k']):>12} {r['tokens']:>2} {r['impl']:<40} "
            f"{r['us']:>8.2f} {r['gbs']:>6.0f} {100 * r['gbs'] / copy_gbs:>6.1f} "
            f"{base[key] / r['us']:>8.3f}x{bad}"
        )
    print("\nBest kernel config per shape and M (CONFIG_TABLE form; the dot entry serves every M >= 2):")
    for (op, m), r in best.items():
        key = "m1" if m == 1 else "m>1"
        speedup = base[(op, m)] / r["us"]
        print(
            f'    ("{key}", {r["n"]}, {r["k"]}): {r["config"]},  # {op[5:]} M={m}: {r["us"]:.2f} us, '
            f"{100 * r['gbs'] / copy_gbs:.1f}% of copy, {speedup:.3f}x cuBLAS"
        )
    for m in sorted({m for _, m in best}):
        faster = [op[5:] for (op, mm), r in best.items() if mm == m and base[(op, m)] / r["us"] > 1.01]
        routed = [op[5:] for (op, mm), r in best.items() if mm == m and gemv_mod.gemv_wins(m, r["n"])]
        print(f"M={m}: best config > 1% faster than cuBLAS on {faster}; `linear` routes {routed}")
    # Batch-1 decode estimate: 32 layers of qkv, o, gate_up, down, plus lm_head.
    per_layer = ("gemv_qkv", "gemv_o_proj", "gemv_gate_up", "gemv_down")
    if all((op, 1) in best for op in (*per_layer, "gemv_lm_head")):

        def token_ms(pick: Callable[[str], float]) -> float:
            return (32 * sum(pick(op) for op in per_layer) + pick("gemv_lm_head")) / 1e3

        def chosen_us(op: str) -> float:
            r = next(r for r in rows if r["op"] == op and r["tokens"] == 1 and r["impl"].endswith("*"))
            return r["us"] if gemv_mod.gemv_wins(1, r["n"]) else base[(op, 1)]

        print(
            "Batch-1 decode, linear layers per token (8B: 32 x (qkv, o, gate_up, down) + lm_head): "
            f"cuBLAS {token_ms(lambda op: base[(op, 1)]):.3f} ms; as `linear` dispatches "
            f"{token_ms(chosen_us):.3f} ms; min(cuBLAS, best config) "
            f"{token_ms(lambda op: min(base[(op, 1)], best[(op, 1)]['us'])):.3f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter crash check)")
    parser.add_argument("--gemv-only", action="store_true", help="only the GEMV cases, sweeping candidate configs")
    parser.add_argument("--copy-gbs", type=float, default=COPY_GBS, help="copy bandwidth the GB/s are compared with")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for tokens in [] if args.gemv_only else [1, 3] if args.smoke else [1, 256, 4096]:
        for name, nbytes, fused, eager in op_cases(tokens, device):
            t_fused, t_eager = bench(fused, device), bench(eager, device)
            rows.append(
                {
                    "op": name,
                    "tokens": tokens,
                    "triton_us": 1e3 * t_fused,
                    "eager_us": 1e3 * t_eager,
                    "triton_gbs": nbytes / t_fused / 1e6,
                }
            )
    gemv = gemv_rows(device, args.smoke, sweep=args.gemv_only)
    if args.out:
        args.out.write_text(json.dumps(rows + gemv, indent=1))
    print(
        f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}, torch {torch.__version__}"
    )
    if rows:
        print(f"{'op':>14} {'tokens':>6} {'triton us':>10} {'eager us':>10} {'speedup':>7} {'triton GB/s':>11}")
    for r in rows:
        print(
            f"{r['op']:>14} {r['tokens']:>6} {r['triton_us']:>10.1f} {r['eager_us']:>10.1f} "
            f"{r['eager_us'] / r['triton_us']:>7.2f} {r['triton_gbs']:>11.0f}"
        )
    print_gemv(gemv, args.copy_gbs)


if __name__ == "__main__":
    main()
