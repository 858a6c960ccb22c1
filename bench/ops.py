"""Fused small ops (Triton) vs the eager torch they replace, Llama-3.1-8B shapes, bf16.

    python bench/ops.py [--out results.json]
    TRITON_INTERPRET=1 python bench/ops.py --smoke   # CPU: tiny shapes, crash check only

Per op and token count (1 = batch-1 decode, 256 = large decode batch, 4096 = prefill):
median time of the Triton kernel and of the eager reference, and the Triton kernel's GB/s
over the bytes it must move (each input read once, each output written once). At 1 token
both are launch-bound: the eager versions launch ~5-10 kernels each, the fused ones one.
Runs in well under a minute on an H100.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter crash check)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for tokens in [1, 3] if args.smoke else [1, 256, 4096]:
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
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print(
        f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}, torch {torch.__version__}"
    )
    print(f"{'op':>14} {'tokens':>6} {'triton us':>10} {'eager us':>10} {'speedup':>7} {'triton GB/s':>11}")
    for r in rows:
        print(
            f"{r['op']:>14} {r['tokens']:>6} {r['triton_us']:>10.1f} {r['eager_us']:>10.1f} "
            f"{r['eager_us'] / r['triton_us']:>7.2f} {r['triton_gbs']:>11.0f}"
        )


if __name__ == "__main__":
    main()
