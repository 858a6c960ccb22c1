"""Ahead-of-time compile of every kernel's default launch configs for sm_90a (H100).

Needs no GPU: Triton lowers each kernel to PTX here and its bundled ptxas assembles it,
which catches what the CPU interpreter cannot (type errors in compiled control flow,
tensor-core shape rules, shared memory over the 227 KB limit) and reports register
spills, which would cost a kernel its speed. The compiles run in a child process without
TRITON_INTERPRET (under it the kernels are interpreted functions), so this also runs in
the interpreter test session. Skipped where Triton is not the 3.6 series this was written
against (the AOT entry points move between releases).

Run directly for the resource report: `python tests/gpu/test_compile_sm90.py`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu

SMEM_LIMIT = 227 * 1024
# The pool's scale views are token-major (kv_format.quantized_views): their head stride
# is 1, which a launch specialises on (Triton makes an int argument of 1 a constant).
TOKEN_MAJOR_SCALES = {"stride_ksh": 1, "stride_vsh": 1}
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
Case = tuple[
    str, Any, dict[str, Any], dict[str, str], int, int
]  # label, kernel, constexprs, pointers, warps, stages


def _cases() -> Iterator[Case]:
    """The launch configs the dispatchers choose, for the shapes the engine runs."""
    import triton

    from rtpllm.kernels import (
        activation,
        decode_attention,
        extend_attention,
        kv_cache,
        rmsnorm,
        rope,
        verify_attention,
    )

    for dtype in (torch.bfloat16, torch.float32):
        for head_dim, group, splits in ((128, 4, 1), (128, 4, 8), (64, 8, 3), (256, 2, 2), (16, 2, 1)):
            t = TYPES[dtype]
            block_n, warps, stages = decode_attention.decode_config(head_dim, dtype)
            consts = {
                "GROUP": group,
                "HEAD_BLOCKS": 1,
                "BLOCK_H": decode_attention._block_h(group),
                "BLOCK_N": block_n,
                "BLOCK_D": triton.next_power_of_2(head_dim),
                "HEAD_DIM": head_dim,
                "PAGE_SIZE": 16,
                "SINGLE": splits == 1,
                "SLIDING": True,
                "FUSE_NEW": True,
                "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                "QUANT": 0,
                "V_MUL": 1.0,
                "F16_DOTS": 0,
                "ORDERED": False,
            }
            ptrs = dict.fromkeys(("Q", "K_new", "V_new", "K_cache", "V_cache", "Out"), t)
            ptrs.update(Block_tables="i32", Seq_lens="i32", Slot_mapping="i64", Mid_o="fp32", Mid_lse="fp32", Order="i32")
            ptrs.update(K_scale="i32", V_scale="i32")  # unused placeholders (QUANT=0)
            label = f"decode D{head_dim} G{group} splits{splits} {t}"
            yield label, decode_attention._decode_stage1_kernel, consts, ptrs, warps, stages
            if head_dim == 128 and splits == 1:  # rows launched in a given order (longest first)
                yield label + " ordered", decode_attention._decode_stage1_kernel, {**consts, "ORDERED": True}, ptrs, warps, stages
    # Quantized KV (fp8 e4m3 / int8 values, fp32 scales): the bf16 model's launches.
    for quant, vt in ((1, "fp8e4nv"), (2, "i8")):
        for head_dim, group, splits in ((128, 4, 1), (128, 4, 8), (64, 8, 3)):
            block_n, warps, stages = decode_attention.decode_config(head_dim, torch.bfloat16, True)
            consts = {
                "GROUP": group, "HEAD_BLOCKS": 1, "BLOCK_H": decode_attention._block_h(group), "BLOCK_N": block_n,
                "BLOCK_D": triton.next_power_of_2(head_dim), "HEAD_DIM": head_dim, "PAGE_SIZE": 16,
                "SINGLE": splits == 1, "SLIDING": False, "FUSE_NEW": True, "PRECISION": "tf32", "QUANT": quant,
                "V_MUL": 448.0 if quant == 1 else 127.0, **TOKEN_MAJOR_SCALES,
                # As launches over the pool's views set it (rows on even addresses).
                "F16_DOTS": decode_attention.f16_dots(quant, torch.bfloat16, words=True),
                "ORDERED": False,
            }
            ptrs = dict.fromkeys(("Q", "K_new", "V_new", "Out"), "bf16")
            ptrs.update(K_cache=vt, V_cache=vt, K_scale="fp32", V_scale="fp32")
            ptrs.update(Block_tables="i32", Seq_lens="i32", Slot_mapping="i64", Mid_o="fp32", Mid_lse="fp32", Order="i32")
            label = f"decode D{head_dim} G{group} splits{splits} bf16 kv={vt} dots{consts['F16_DOTS']}"
            yield label, decode_attention._decode_stage1_kernel, consts, ptrs, warps, stages
            if head_dim == 128 and splits == 1:
                yield label + " ordered", decode_attention._decode_stage1_kernel, {**consts, "ORDERED": True}, ptrs, warps, stages
            # The other way: tiles loaded whole into dots in the query's dtype (a head_dim
            # that is not a power of two, or FP8_WIDEN_PAIRS / INT8_WIDEN_PAIRS off).
            other = 0 if consts["F16_DOTS"] == 2 else 2
            label = label.replace(f"dots{consts['F16_DOTS']}", f"dots{other}")
            yield label, decode_attention._decode_stage1_kernel, {**consts, "F16_DOTS": other}, ptrs, warps, stages
    # Verify attention (a sequence's k + 1 rows over its KV at once): k = 4 and k = 7 on
    # the 8B shape (group 4), a group-8 shape, fp32 and the quantized caches.
    for (head_dim, group, span, splits), (dt, vt, quant) in (
        ((128, 4, 5, 1), ("bf16", "bf16", 0)), ((128, 4, 8, 8), ("bf16", "bf16", 0)), ((64, 8, 5, 3), ("bf16", "bf16", 0)),
        ((128, 4, 5, 2), ("fp32", "fp32", 0)), ((128, 4, 5, 8), ("bf16", "fp8e4nv", 1)), ((128, 4, 5, 8), ("bf16", "i8", 2)),
    ):  # fmt: skip
        tile = verify_attention.verify_tile_rows(group, span)
        block_n, warps, stages = verify_attention.verify_config(tile, torch.float32 if dt == "fp32" else torch.bfloat16, quant != 0)
        consts = {
            "GROUP": group, "GROUP_P2": triton.next_power_of_2(group), "BLOCK_M": tile, "BLOCK_N": block_n,
            "BLOCK_D": triton.next_power_of_2(head_dim), "HEAD_DIM": head_dim, "PAGE_SIZE": 16, "SINGLE": splits == 1,
            "SLIDING": quant == 0, "PRECISION": "ieee" if dt == "fp32" else "tf32", "QUANT": quant,
            "V_MUL": {0: 1.0, 1: 448.0, 2: 127.0}[quant], **(TOKEN_MAJOR_SCALES if quant else {}),
            "F16_DOTS": decode_attention.f16_dots(quant, torch.float32 if dt == "fp32" else torch.bfloat16),
        }  # fmt: skip
        ptrs = dict.fromkeys(("Q", "Out"), dt)
        ptrs.update(K_cache=vt, V_cache=vt, K_scale="fp32" if quant else "i32", V_scale="fp32" if quant else "i32")
        ptrs.update(Block_tables="i32", Seq_lens="i32", Spans="i32", Mid_o="fp32", Mid_lse="fp32")
        label = f"verify D{head_dim} G{group} rows{span} splits{splits} {dt} kv={vt}"
        yield label, verify_attention._verify_stage1_kernel, consts, ptrs, warps, stages
    consts = {"SPLITS_P2": 8, "BLOCK_D": 128, "HEAD_DIM": 128}
    ptrs = {"Mid_o": "fp32", "Mid_lse": "fp32", "Out": "bf16"}
    yield "decode merge splits8", decode_attention._decode_reduce_kernel, consts, ptrs, 4, 1

    for head_dim, dtype, max_query_len in (
        (128, torch.bfloat16, 4096),
        (128, torch.bfloat16, 32),
        (64, torch.float16, 4096),
        (64, torch.float16, 32),
        (256, torch.bfloat16, 512),
        (128, torch.float32, 512),
        (64, torch.float32, 512),
        (16, torch.float32, 512),
    ):
        for sliding in (False, True):
            t = TYPES[dtype]
            block_m, block_n, warps, stages = extend_attention.extend_config(head_dim, dtype, max_query_len)
            consts = {
                "GROUP": 4,
                "BLOCK_M": block_m,
                "BLOCK_N": block_n,
                "BLOCK_D": triton.next_power_of_2(head_dim),
                "HEAD_DIM": head_dim,
                "PAGE_SIZE": 16,
                "SLIDING": sliding,
                "WRITE_KV": True,
                "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                "QUANT": 0,
                "V_MUL": 1.0,
                "NEW_FROM_CACHE": False,
            }
            ptrs = dict.fromkeys(("Q", "K", "V", "K_cache", "V_cache", "Out"), t)
            ptrs.update(Block_tables="i32", Query_start_loc="i32", Seq_lens="i32", Slot_mapping="i64")
            ptrs.update(K_scale="i32", V_scale="i32")  # unused placeholders (QUANT=0)
            label = f"extend D{head_dim} q<={max_query_len} sliding={int(sliding)} {t} {(block_m, block_n, warps, stages)}"
            yield label, extend_attention._extend_kernel, consts, ptrs, warps, stages
    for quant, vt in ((1, "fp8e4nv"), (2, "i8")):
        for head_dim, max_query_len in ((128, 4096), (128, 32), (64, 4096)):
            block_m, block_n, warps, stages = extend_attention.extend_config(head_dim, torch.bfloat16, max_query_len, True)
            consts = {
                "GROUP": 4, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": triton.next_power_of_2(head_dim),
                "HEAD_DIM": head_dim, "PAGE_SIZE": 16, "SLIDING": False, "WRITE_KV": True, "PRECISION": "tf32",
                "QUANT": quant, "V_MUL": 448.0 if quant == 1 else 127.0, **TOKEN_MAJOR_SCALES,
            }
            ptrs = dict.fromkeys(("Q", "K", "V", "Out"), "bf16")
            ptrs.update(K_cache=vt, V_cache=vt, K_scale="fp32", V_scale="fp32")
            ptrs.update(Block_tables="i32", Query_start_loc="i32", Seq_lens="i32", Slot_mapping="i64")
            label = f"extend D{head_dim} q<={max_query_len} bf16 kv={vt} {(block_m, block_n, warps, stages)}"
            yield label, extend_attention._extend_kernel, {**consts, "NEW_FROM_CACHE": False}, ptrs, warps, stages
            # The new tokens read back from the cache (triton_backend.QUANT_EXTEND_STORE_FIRST).
            block_m, block_n, warps, stages = extend_attention.extend_config(head_dim, torch.bfloat16, max_query_len, True, True)
            consts = {**consts, "BLOCK_M": block_m, "BLOCK_N": block_n, "WRITE_KV": False, "NEW_FROM_CACHE": True}
            label = f"extend D{head_dim} q<={max_query_len} bf16 kv={vt} from cache {(block_m, block_n, warps, stages)}"
            yield label, extend_attention._extend_kernel, consts, ptrs, warps, stages

    bf = "bf16"
    consts = {"NUM_KV_HEADS": 8, "BLOCK_H": 8, "BLOCK_D": 128, "HEAD_DIM": 128, "PAGE_SIZE": 16, "QUANT": 0}
    ptrs = {"K": bf, "V": bf, "K_cache": bf, "V_cache": bf, "Slot_mapping": "i64", "K_scale": "i32", "V_scale": "i32"}
    yield "store_kv", kv_cache._store_kv_kernel, consts, ptrs, 4, 1
    for quant, vt in ((1, "fp8e4nv"), (2, "i8")):
        consts = {"NUM_KV_HEADS": 8, "BLOCK_H": 8, "BLOCK_D": 128, "HEAD_DIM": 128, "PAGE_SIZE": 16, "QUANT": quant, **TOKEN_MAJOR_SCALES}
        ptrs = {"K": bf, "V": bf, "K_cache": vt, "V_cache": vt, "Slot_mapping": "i64", "K_scale": "fp32", "V_scale": "fp32"}
        yield f"store_kv kv={vt}", kv_cache._store_kv_kernel, consts, ptrs, 4, 1
    consts = {"N": 4096, "BLOCK": 4096, "HAS_RESIDUAL": True}
    ptrs = {"X": bf, "Residual": bf, "W": bf, "Out": bf, "Res_out": bf}
    yield "add_rms_norm 4096", rmsnorm._rms_norm_kernel, consts, ptrs, 8, 1
    consts = {
        "NUM_Q_HEADS": 32,
        "NUM_K_HEADS": 8,
        "BLOCK_HQ": 32,
        "BLOCK_HK": 8,
        "HALF": 64,
        "BLOCK_HALF": 64,
        "HAS_NORM": True,
        "HAS_SHIFT": False,
    }
    ptrs = {"Q": bf, "K": bf, "Positions": "i64", "Cos": bf, "Sin": bf, "Qw": bf, "Kw": bf, "KShift": bf}
    yield "rope+qk_norm", rope._rope_kernel, consts, ptrs, 4, 1
    yield "rope+k_shift", rope._rope_kernel, {**consts, "HAS_NORM": False, "HAS_SHIFT": True}, ptrs, 4, 1
    yield (
        "silu_and_mul",
        activation._silu_and_mul_kernel,
        {"N": 14336, "BLOCK": 1024},
        {"X": bf, "Out": bf},
        4,
        1,
    )


def _compile(case: Case) -> dict[str, Any]:
    """Compile one case for sm_90a with the alignment hints launches give, then assemble
    its PTX with ptxas -v: shared memory, registers and spill bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label, fn, consts, ptrs, num_warps, num_stages = case
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("sm_scale_log2", "eps"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            # Row strides of q/k/v/caches/outputs are multiples of 16 elements in practice
            # (Triton specialises on that at launch); block-table and scratch strides may not be.
            if name.startswith("stride") and name not in ("stride_bt", "stride_lb", "stride_lh", "stride_ms"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = Path(os.environ.get("TMPDIR", "/tmp")) / f"rtpllm_sm90_{os.getpid()}.ptx"
    ptx.write_text(kernel.asm["ptx"])
    try:
        report = subprocess.run(
            [str(_ptxas()), "--gpu-name", "sm_90a", "-v", str(ptx), "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    finally:
        ptx.unlink(missing_ok=True)
    regs = re.search(r"Used (\d+) registers", report)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    return {
        "label": label,
        "shared": kernel.metadata.shared,
        "registers": int(regs.group(1)) if regs else -1,
        "spill_bytes": max(spills) if spills else -1,
        "wgmma": "wgmma" in kernel.asm["ptx"],
    }


def _ptxas() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def main() -> None:
    """Child-process entry: compile every case and print one JSON list (last line)."""
    report = sys.argv[1:] == ["--report"]
    results = []
    for case in _cases():
        try:
            res = _compile(case)
        except Exception as exc:
            res = {"label": case[0], "error": repr(exc)[:800]}
        results.append(res)
        if report:
            print(res, flush=True)
    print(json.dumps(results))


def test_kernels_compile_for_sm90() -> None:
    triton = pytest.importorskip("triton")
    if not triton.__version__.startswith("3.6"):
        pytest.skip(f"AOT entry points checked against Triton 3.6, found {triton.__version__}")
    if not _ptxas().is_file():
        pytest.skip("Triton's bundled ptxas not found")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    libs = str(Path(__file__).resolve().parents[2] / "libs")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (libs, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = [r for r in results if "error" in r or r["spill_bytes"] != 0 or r["shared"] > SMEM_LIMIT]
    assert not bad, "\n".join(map(str, bad))


if __name__ == "__main__":
    main()
