"""Probe exact key/value transforms before KV quantization, on real weights and text.

Each variant runs the engine with a patched attention layer (the transforms are not all
in the engine: this measures whether they would be worth building), scored as
`bench/kv_quant.py accuracy` scores: perplexity and greedy next-token agreement against
bf16 KV on ShareGPT texts. A variant is FORMAT+OPTIONS, OPTIONS letters of:

- c: K centering, every layer's mean rotated key over the calibration texts subtracted
  after RoPE (built: rtpllm.models.k_centering, chosen per layer by the calibration);
- v: V centering, the mean value subtracted before the cache and added back to the
  attention output (exact: the weights sum to 1);
- h: a Hadamard rotation of q and k after RoPE (and the shift): q . k is unchanged.

    python bench/kv_transform_probe.py MODEL --variants fp8+c,fp8+ch,int8+ch [--texts 8 --calib-texts 4 --max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "libs"))
sys.path.insert(0, str(ROOT))

from bench.kv_quant import real_texts, score  # noqa: E402
from rtpllm import LLM, SamplingParams  # noqa: E402
from rtpllm.models import layers  # noqa: E402
from rtpllm.models.registry import resolve_model  # noqa: E402
from rtpllm.tokenizer import Tokenizer  # noqa: E402


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal n x n Sylvester Hadamard matrix (n a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


class Probe:
    """The patched attention forward and its switches (one engine at a time)."""

    def __init__(self) -> None:
        self.capture = False
        self.k_mean: list[torch.Tensor] | None = None  # per layer [Hkv, D], when centering K
        self.v_mean: list[torch.Tensor] | None = None
        self.rotate = False
        self.sums: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def forward(self, attn: Any, positions: torch.Tensor, x: torch.Tensor, kv_cache: Any, meta: Any, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = attn.rotated_qkv(positions, x, cos, sin)  # no K shift: the model has no plan
        layer = attn.probe_index
        if self.capture:
            ks, vs, n = self.sums.get(layer, (0.0, 0.0, 0))
            self.sums[layer] = (k.double().sum(0) + ks, v.double().sum(0) + vs, n + tokens)
        if self.k_mean is not None:
            k = k - self.k_mean[layer].to(k.dtype)
        v_mean = self.v_mean[layer].to(v.dtype) if self.v_mean is not None else None
        if v_mean is not None:
            v = v - v_mean
        if self.rotate:
            h = hadamard(attn.head_dim).to(k.dtype)
            q, k = (q @ h).contiguous(), (k @ h).contiguous()
        out = attn.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, attn.scale, attn.sliding_window, *kv_cache[2:])
        if v_mean is not None:
            per_q = attn.num_heads // attn.num_kv_heads
            out = (out.view(tokens, attn.num_heads, attn.head_dim) + v_mean.repeat_interleave(per_q, 0)).view(out.shape)
        return attn.o_proj(out.reshape(tokens, attn.q_size))


def install(probe: Probe) -> None:
    """Every Attention built from now on numbers itself (from 0 again after
    `probe.reset_count()`, before each engine) and runs `probe.forward`."""
    count = [0]
    init = layers.Attention.__init__

    def numbered(self: Any, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        self.probe_index = count[0]
        count[0] += 1

    layers.Attention.__init__ = numbered  # type: ignore[method-assign]
    layers.Attention.forward = lambda self, *a: probe.forward(self, *a)  # type: ignore[method-assign]
    probe.reset_count = lambda: count.__setitem__(0, 0)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--variants", default="fp8+c,fp8+ch,int8+c,int8+ch")
    ap.add_argument("--texts", type=int, default=8)
    ap.add_argument("--calib-texts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    probe = Probe()
    install(probe)
    texts, source = real_texts(args.texts + args.calib_texts)
    tok = Tokenizer.from_dir(resolve_model(args.model))
    ids = [tok.encode(t)[: args.max_tokens] for t in texts[: args.texts]]
    calib = [tok.encode(t)[: args.max_tokens] for t in texts[args.texts :]]
    probe.capture = True
    probe.reset_count()  # type: ignore[attr-defined]
    llm = LLM(args.model, device="cpu", enable_prefix_caching=False, max_num_batched_tokens=4096)
    llm.generate(calib, SamplingParams(temperature=0, max_tokens=1))
    llm.close()
    probe.capture = False
    n = len(probe.sums)
    k_mean = [(probe.sums[i][0] / probe.sums[i][2]).float() for i in range(n)]
    v_mean = [(probe.sums[i][1] / probe.sums[i][2]).float() for i in range(n)]
    runs: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for name in ["bf16", *[v for v in args.variants.split(",") if v]]:
        fmt, _, opts = name.partition("+")
        probe.k_mean = k_mean if "c" in opts else None
        probe.v_mean = v_mean if "v" in opts else None
        probe.rotate = "h" in opts
        probe.reset_count()  # type: ignore[attr-defined]
        runs[name] = score(args.model, ids, kv_cache_dtype=fmt)
        print(f"{name}: scored", flush=True)
    ref = runs["bf16"]
    rows = {}
    for name, run in runs.items():
        agree = sum(a == b for a, b in zip(run["top1"], ref["top1"], strict=True)) / len(ref["top1"])
        rows[name] = {"ppl": run["ppl"], "ppl_change_vs_bf16_pct": 100 * (run["ppl"] / ref["ppl"] - 1), "top1_agreement_vs_bf16_pct": 100 * agree}
        print(f"{name:14s} ppl {run['ppl']:.4f} ({rows[name]['ppl_change_vs_bf16_pct']:+.3f}%) agreement {rows[name]['top1_agreement_vs_bf16_pct']:.2f}%")
    if args.out:
        doc = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": "python bench/kv_transform_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "text_source": source,
            "eval_tokens": ref["tokens"],
            "seconds": time.perf_counter() - t0,
            "variants": rows,
        }
        args.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
