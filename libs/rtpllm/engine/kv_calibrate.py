"""KV-cache calibration: measure each layer's attention-output error under each KV
format on real prompts, and write a per-layer plan the engine loads (--kv-cache-plan).

    python -m rtpllm.engine.kv_calibrate MODEL --out plan.json [--prompts FILE] [--threshold X]

How it measures: the prompts are prefilled by an engine with plain KV (the model's dtype)
whose attention backend is the torch reference plus a measurement. At every layer of every
step it attends each query a second time per format over its context round-tripped
through that format (quantize, dequantize: what the quantized cache would hold for the
same inputs) and accumulates ||o_fmt - o||^2 and ||o||^2. A layer's error is the
relative L2 error of its attention output, sqrt(sum ||o_fmt - o||^2 / sum ||o||^2), with
every layer fed the unquantized model's activations, so errors do not compound and each
layer is judged on its own.

K smoothing (rtpllm.models.k_smoothing): with int8 among the formats, the prompts run
twice. The first run records each layer's largest |k| per KV head and channel; the
second also measures int8 with keys stored as k / s for s made from those ranges under
each of a few alphas, and a layer's int8 error is its best (alpha 0, no smoothing,
included). The plan file carries the chosen vectors of its int8 layers.

The plan: each layer takes the format of lowest error (fp8 and int8 cost the same
bytes); a layer whose lowest error exceeds the threshold stays in the model's dtype
("auto"). The default threshold is `relative_threshold` times the median layer error
(the outliers: a layer markedly more sensitive than its peers). At most
`max_skip_fraction` of the layers stay unquantized, the worst first.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rtpllm.attention.backend import AttentionBackend, AttentionMetadata, register_backend
from rtpllm.attention.torch_ref import TorchReferenceBackend
from rtpllm.kernels.attention_ref import gather_context, reference_attention
from rtpllm.kernels.kv_quant import QUANT_FORMATS, roundtrip_ref
from rtpllm.kvcache.kv_plan import KVCachePlan
from rtpllm.models.k_smoothing import CALIBRATION_ALPHAS, smoothing_vectors

BACKEND_NAME = "kv-calibrate"

# A few paragraphs of plain English prose (written for this project) for calibrating
# without a prompt file; benchmarks pass real conversations (bench/kv_quant.py).
DEFAULT_PROMPTS = (
    "The river begins high in the mountains, where snow melts each spring and feeds a "
    "hundred small streams. By the time it reaches the valley it is wide and slow, and "
    "farmers along its banks have used its water for centuries to grow wheat, barley and "
    "grapes. In dry years the villages downstream argue with those upstream about how much "
    "water each may take, and the old agreements, written on parchment and kept in the town "
    "hall, are read aloud again.",
    "To make bread at home you need flour, water, salt and yeast. Mix the flour and water "
    "first and let the dough rest for half an hour; this lets the flour absorb the water "
    "and makes kneading easier. Then add the salt and the yeast, knead for ten minutes "
    "until the dough is smooth, and leave it covered in a warm place until it has doubled "
    "in size. Shape it gently, let it rise once more, and bake it in a hot oven.",
    "The committee met on Tuesday to discuss the budget for the coming year. Several "
    "members argued that the library should receive more money, since the number of "
    "visitors had grown by a third, while others wanted to repair the roads before winter. "
    "After a long debate they agreed to split the surplus, and asked the treasurer to "
    "prepare a detailed proposal for the next meeting.",
    "Light from the sun takes about eight minutes to reach the earth. When it passes "
    "through the atmosphere, the shorter blue wavelengths are scattered more than the red "
    "ones, which is why the sky looks blue during the day and the sun looks orange or red "
    "when it is low on the horizon at sunrise and sunset.",
)


@dataclass
class LayerErrors:
    """Accumulated squared errors per format and layer, and the reference's squared norm."""

    num_layers: int
    formats: tuple[str, ...] = QUANT_FORMATS
    sq_err: dict[str, list[float]] = field(default_factory=dict)
    sq_ref: list[float] = field(default_factory=list)
    tokens: int = 0

    def __post_init__(self) -> None:
        self.sq_err = {f: [0.0] * self.num_layers for f in self.formats}
        self.sq_ref = [0.0] * self.num_layers

    def relative(self) -> dict[str, list[float]]:
        """Per format, per layer: sqrt(sum ||o_fmt - o||^2 / sum ||o||^2)."""
        return {
            f: [math.sqrt(e / r) if r > 0 else 0.0 for e, r in zip(errs, self.sq_ref, strict=True)]
            for f, errs in self.sq_err.items()
        }


class MeasuringBackend(AttentionBackend):
    """The torch reference backend that also measures what each KV format would change.

    Layers call the backend in order, once per model forward: call c is layer
    c % num_layers (the engine runs nothing else through it). Every call also records
    each layer's largest |k| per KV head and channel (what K smoothing is made from)."""

    name = BACKEND_NAME

    def __init__(self, num_layers: int, formats: Sequence[str] = QUANT_FORMATS) -> None:
        self.inner = TorchReferenceBackend()
        self.formats = tuple(formats)
        # int8 candidates with K smoothing: name -> per layer [Hkv, D] vectors.
        self.smoothed: dict[str, list[torch.Tensor]] = {}
        self.errors = LayerErrors(num_layers, self.formats)
        self.k_amax: list[torch.Tensor | None] = [None] * num_layers
        self.calls = 0

    def measure_smoothed(self, smoothed: dict[str, list[torch.Tensor]]) -> None:
        """Start the measurement afresh, with these K-smoothing candidates besides the formats."""
        self.smoothed = smoothed
        self.errors = LayerErrors(self.errors.num_layers, (*self.formats, *smoothed))
        self.calls = 0

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
    ) -> torch.Tensor:
        if k_scale is not None:
            raise ValueError("calibration measures from plain KV: run it with --kv-cache-dtype auto")
        layer = self.calls % self.errors.num_layers
        self.calls += 1
        out = self.inner.forward(q, k, v, k_cache, v_cache, meta, scale, sliding_window)
        qsl = meta.query_start_loc_host
        for i, seq_len in enumerate(meta.seq_lens_host):
            start, end = qsl[i], qsl[i + 1]
            table = meta.block_tables[i]
            k_ctx = gather_context(k_cache, table, seq_len).float()
            v_ctx = gather_context(v_cache, table, seq_len).float()
            amax = k_ctx.abs().amax(0)
            seen = self.k_amax[layer]
            self.k_amax[layer] = amax if seen is None else torch.maximum(seen, amax)
            ref = out[start:end].float()
            qf = q[start:end].float()
            self.errors.sq_ref[layer] += float(ref.square().sum())
            for fmt in self.errors.formats:
                vectors = self.smoothed.get(fmt)
                if vectors is None:
                    kq = roundtrip_ref(k_ctx, fmt, torch.float32)
                    vq = roundtrip_ref(v_ctx, fmt, torch.float32)
                else:
                    # Stored k / s, attended with q * s: the same as (k / s)-roundtrip * s with q.
                    s = vectors[layer].to(k_ctx.device)
                    kq = roundtrip_ref(k_ctx / s, "int8", torch.float32) * s
                    vq = roundtrip_ref(v_ctx, "int8", torch.float32)
                o = reference_attention(qf, kq, vq, scale, sliding_window)
                self.errors.sq_err[fmt][layer] += float((o - ref).square().sum())
            if layer == 0:
                self.errors.tokens += end - start
        return out


@dataclass
class Measurement:
    """What `measure` found: per format and layer the relative attention-output error
    (int8's with the layer's best K smoothing), and the smoothing that achieved it."""

    errors: dict[str, list[float]]
    tokens: int
    identity: str  # the model's weights identity
    k_smooth: dict[int, list[list[float]]] = field(default_factory=dict)
    k_smooth_alpha: dict[int, float] = field(default_factory=dict)
    # Every int8 smoothing candidate's errors, "int8~0" the unsmoothed (informative).
    candidates: dict[str, list[float]] = field(default_factory=dict)

    def plan(self, layers: Sequence[str], threshold: float | None) -> KVCachePlan:
        """The plan file for `layers`: smoothing kept on its int8 layers only."""
        keep = {i for i, f in enumerate(layers) if f == "int8"}
        return KVCachePlan(
            tuple(layers),
            model=self.identity,
            threshold=threshold,
            errors=self.errors,
            k_smooth={i: v for i, v in self.k_smooth.items() if i in keep},
            k_smooth_alpha={i: a for i, a in self.k_smooth_alpha.items() if i in keep},
        )


def measure(
    model: str,
    prompts: Sequence[str] | Sequence[list[int]],
    device: str = "cpu",
    dtype: str = "auto",
    formats: Sequence[str] = QUANT_FORMATS,
    max_prompt_tokens: int = 1024,
    smooth_alphas: Sequence[float] = CALIBRATION_ALPHAS,
) -> Measurement:
    """Per-format, per-layer relative attention-output errors over `prompts` (text or
    token ids). With int8 among the formats and `smooth_alphas`, the prompts run twice:
    once to find K's channel ranges, once to measure int8 under each smoothing too."""
    # Here: the engine layer is above this module's measuring backend.
    from rtpllm.llm import LLM
    from rtpllm.models.config import ModelConfig
    from rtpllm.models.registry import resolve_model
    from rtpllm.sampling_params import SamplingParams

    cfg = ModelConfig.from_dir(resolve_model(model))
    backend = MeasuringBackend(cfg.num_layers, formats)
    register_backend(BACKEND_NAME, lambda: backend)
    llm = LLM(model, device=device, dtype=dtype, attention_backend=BACKEND_NAME, enable_prefix_caching=False, cuda_graphs=False)
    try:
        tok = llm.engine.tokenizer
        ids = [p if isinstance(p, list) else tok.encode(p) for p in prompts]  # type: ignore[union-attr]
        ids = [p[:max_prompt_tokens] for p in ids if len(p) >= 2]
        greedy = SamplingParams(temperature=0, max_tokens=1)
        smooth = "int8" in formats and bool(smooth_alphas)
        if smooth:
            llm.generate(ids, greedy)  # K's channel ranges first
            amax = [a if a is not None else torch.ones(cfg.num_kv_heads, cfg.head_dim) for a in backend.k_amax]
            backend.measure_smoothed(
                {f"int8~{a:g}": [smoothing_vectors(m, a, shared=cfg.qk_norm) for m in amax] for a in smooth_alphas}
            )
        llm.generate(ids, greedy)
        identity = llm.engine.weights_identity
    finally:
        llm.close()
    measured = backend.errors.relative()
    errors = {f: measured[f] for f in formats}
    result = Measurement(errors, backend.errors.tokens, identity)
    if smooth:
        result.candidates = {"int8~0": list(errors["int8"])} | {n: measured[n] for n in backend.smoothed}
        for layer in range(cfg.num_layers):
            name = min(backend.smoothed, key=lambda n: measured[n][layer])
            if measured[name][layer] < errors["int8"][layer]:
                errors["int8"][layer] = measured[name][layer]
                result.k_smooth[layer] = backend.smoothed[name][layer].tolist()
                result.k_smooth_alpha[layer] = float(name.split("~")[1])
    return result


def choose_plan(
    errors: dict[str, list[float]],
    threshold: float | None = None,
    relative_threshold: float = 3.0,
    max_skip_fraction: float = 0.25,
) -> tuple[list[str], float]:
    """Per layer the lowest-error format, or "auto" (the model's dtype) above the threshold."""
    formats = list(errors)
    num_layers = len(errors[formats[0]])
    best = [min(formats, key=lambda f, i=i: errors[f][i]) for i in range(num_layers)]
    best_err = [errors[best[i]][i] for i in range(num_layers)]
    if threshold is None:
        threshold = relative_threshold * statistics.median(best_err)
    over = sorted((i for i in range(num_layers) if best_err[i] > threshold), key=lambda i: -best_err[i])
    keep = set(over[: int(max_skip_fraction * num_layers)])
    return ["auto" if i in keep else best[i] for i in range(num_layers)], threshold


def read_prompts(path: str | None) -> list[str]:
    """Paragraphs of a text file (blank-line separated), or the built-in prose."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    text = Path(path).read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtpllm.engine.kv_calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a known model name or an HF-format directory")
    parser.add_argument("--out", required=True, help="where to write the plan (JSON)")
    parser.add_argument("--prompts", help="text file of calibration prompts, blank-line separated (default: built-in prose)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threshold", type=float, help="relative attention-output error above which a layer stays in the model's dtype (default: 3x the median layer's)")
    parser.add_argument("--max-skip-fraction", type=float, default=0.25, help="at most this fraction of layers stays unquantized")
    parser.add_argument("--formats", default="fp8,int8", help="formats to consider, comma-separated")
    parser.add_argument("--no-k-smoothing", action="store_true", help="do not try per-channel K smoothing for int8 layers")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    alphas = [] if args.no_k_smoothing else list(CALIBRATION_ALPHAS)
    found = measure(args.model, read_prompts(args.prompts), args.device, args.dtype, formats, smooth_alphas=alphas)
    layers, threshold = choose_plan(found.errors, args.threshold, max_skip_fraction=args.max_skip_fraction)
    plan = found.plan(layers, threshold)
    plan.save(args.out)
    print(f"measured {found.tokens} tokens over {len(layers)} layers; threshold {threshold:.4g}")
    for i, fmt in enumerate(layers):
        row = "  ".join(f"{f}={found.errors[f][i]:.4f}" for f in found.errors)
        smooth = f"  (K smoothing, alpha {plan.k_smooth_alpha[i]:g}; unsmoothed int8 {found.candidates['int8~0'][i]:.4f})" if i in plan.k_smooth else ""
        print(f"layer {i:3d}: {row}  -> {fmt}{smooth}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
