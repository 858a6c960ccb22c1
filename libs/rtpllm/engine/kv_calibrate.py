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

Key transforms: the prompts run twice. The first run records each layer's mean rotated
key and every channel's range per KV head. The second measures the formats on centered
keys, k - m with m that mean (K centering, rtpllm.models.k_centering: exact, and on
Qwen2.5-Coder-1.5B it takes fp8's perplexity change from +8% to +0.3%), uncentered
beside them, and int8 also with keys stored as (k - m) / s, for s made from the centered
ranges under each of a few alphas (K smoothing, rtpllm.models.k_smoothing). A layer's
error in a format is its best candidate's (the others stay in `Measurement.candidates`).
The plan file carries the shifts of its quantized layers that measured better centered
and the smoothing of its int8 layers.

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


@dataclass
class KeyStats:
    """One layer's rotated keys so far, per KV head and channel: their sum (for the
    mean), count, largest and smallest."""

    total: torch.Tensor
    count: int
    high: torch.Tensor
    low: torch.Tensor

    @classmethod
    def of(cls, k: torch.Tensor) -> KeyStats:
        k = k.double()
        return cls(k.sum(0), k.shape[0], k.amax(0), k.amin(0))

    def add(self, k: torch.Tensor) -> None:
        k = k.double()
        self.total += k.sum(0)
        self.count += k.shape[0]
        self.high = torch.maximum(self.high, k.amax(0))
        self.low = torch.minimum(self.low, k.amin(0))

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / self.count).float()

    def amax(self, center: torch.Tensor | None) -> torch.Tensor:
        """The largest |k - center| per KV head and channel (|k| without a center)."""
        c = center.double() if center is not None else torch.zeros_like(self.high)
        return torch.maximum(self.high - c, c - self.low).float()


class MeasuringBackend(AttentionBackend):
    """The torch reference backend that also measures what each KV format would change.

    Layers call the backend in order, once per model forward: call c is layer
    c % num_layers (the engine runs nothing else through it). Every call also records
    each layer's key statistics (`KeyStats`: what the key transforms are made from)."""

    name = BACKEND_NAME

    def __init__(self, num_layers: int, formats: Sequence[str] = QUANT_FORMATS) -> None:
        self.inner = TorchReferenceBackend()
        self.formats = tuple(formats)
        # Per layer [Hkv, D] shifts the formats are measured on (K centering); None: raw keys.
        self.centers: list[torch.Tensor] | None = None
        # int8 candidates with K smoothing: name -> per layer [Hkv, D] vectors.
        self.smoothed: dict[str, list[torch.Tensor]] = {}
        self.errors = LayerErrors(num_layers, self.formats)
        self.key_stats: list[KeyStats | None] = [None] * num_layers
        self.calls = 0

    def measure_transformed(self, centers: list[torch.Tensor] | None, smoothed: dict[str, list[torch.Tensor]]) -> None:
        """Start the measurement afresh: the formats on keys centered by `centers` (None:
        not centered), the uncentered formats beside them as "<format>~raw", and these
        int8 K-smoothing candidates (centered too)."""
        self.centers = centers
        self.smoothed = smoothed
        raw = tuple(f"{f}~raw" for f in self.formats) if centers is not None else ()
        self.errors = LayerErrors(self.errors.num_layers, (*self.formats, *raw, *smoothed))
        self.calls = 0

    def _roundtrip_keys(self, k: torch.Tensor, name: str, layer: int) -> torch.Tensor:
        """What attention would see of keys `k` stored under candidate `name`, shifted
        back (softmax ignores the shift; the error is then comparable with the reference)."""
        fmt, _, variant = name.partition("~")
        center = None if variant == "raw" or self.centers is None else self.centers[layer].to(k.device)
        vectors = self.smoothed.get(name)
        x = k - center if center is not None else k
        if vectors is None:
            x = roundtrip_ref(x, fmt, torch.float32)
        else:
            # Stored (k - m) / s, attended with q * s: the same as the roundtrip times s with q.
            s = vectors[layer].to(k.device)
            x = roundtrip_ref(x / s, fmt, torch.float32) * s
        return x + center if center is not None else x

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
        if k_scale is not None:
            raise ValueError("calibration measures from plain KV: run it with --kv-cache-dtype auto")
        layer = self.calls % self.errors.num_layers
        self.calls += 1
        out = self.inner.forward(q, k, v, k_cache, v_cache, meta, scale, sliding_window, out=out)
        # The step's new keys, each counted once (a context is gathered again by every chunk).
        stats = self.key_stats[layer]
        if stats is None:
            self.key_stats[layer] = KeyStats.of(k.float())
        else:
            stats.add(k.float())
        qsl = meta.query_start_loc_host
        for i, seq_len in enumerate(meta.seq_lens_host):
            start, end = qsl[i], qsl[i + 1]
            table = meta.block_tables[i]
            k_ctx = gather_context(k_cache, table, seq_len).float()
            v_ctx = gather_context(v_cache, table, seq_len).float()
            ref = out[start:end].float()
            qf = q[start:end].float()
            self.errors.sq_ref[layer] += float(ref.square().sum())
            for name in self.errors.formats:
                kq = self._roundtrip_keys(k_ctx, name, layer)
                vq = roundtrip_ref(v_ctx, name.partition("~")[0], torch.float32)
                o = reference_attention(qf, kq, vq, scale, sliding_window)
                self.errors.sq_err[name][layer] += float((o - ref).square().sum())
            if layer == 0:
                self.errors.tokens += end - start
        return out


@dataclass
class Measurement:
    """What `measure` found: per format and layer the relative attention-output error
    (on centered keys where `k_mean` is set; int8's with the layer's best K smoothing),
    and the transforms that achieved it."""

    errors: dict[str, list[float]]
    tokens: int
    identity: str  # the model's weights identity
    k_smooth: dict[int, list[list[float]]] = field(default_factory=dict)
    k_smooth_alpha: dict[int, float] = field(default_factory=dict)
    # Per layer the mean rotated key of the unsmoothed model (the K centering shift), and
    # per format the layers whose keys measured better centered than not.
    k_mean: dict[int, list[list[float]]] = field(default_factory=dict)
    centered: dict[str, set[int]] = field(default_factory=dict)
    # The other candidates' errors (informative): "int8~0" centered int8 unsmoothed,
    # "int8~<alpha>" each smoothing, "<format>~raw" uncentered.
    candidates: dict[str, list[float]] = field(default_factory=dict)

    def plan(self, layers: Sequence[str], threshold: float | None) -> KVCachePlan:
        """The plan file for `layers`: smoothing kept on its int8 layers only, shifts on
        its quantized layers that measured better centered in their format (in the
        smoothed keys' units where the layer is smoothed)."""
        smooth = {i: v for i, v in self.k_smooth.items() if layers[i] == "int8"}
        center: dict[int, list[list[float]]] = {}
        for i, m in self.k_mean.items():
            if i in self.centered.get(layers[i], ()):
                shift = torch.tensor(m)
                if i in smooth:
                    shift = shift / torch.tensor(smooth[i])
                center[i] = shift.tolist()
        return KVCachePlan(
            tuple(layers),
            model=self.identity,
            threshold=threshold,
            errors=self.errors,
            k_smooth=smooth,
            k_smooth_alpha={i: a for i, a in self.k_smooth_alpha.items() if i in smooth},
            k_center=center,
        )


def measure(
    model: str,
    prompts: Sequence[str] | Sequence[list[int]],
    device: str = "cpu",
    dtype: str = "auto",
    formats: Sequence[str] = QUANT_FORMATS,
    max_prompt_tokens: int = 1024,
    smooth_alphas: Sequence[float] = CALIBRATION_ALPHAS,
    center: bool = True,
) -> Measurement:
    """Per-format, per-layer relative attention-output errors over `prompts` (text or
    token ids). With `center`, or int8 among the formats and `smooth_alphas`, the
    prompts run twice: once for the keys' statistics, once to measure the formats on
    centered keys and int8 under each smoothing too."""
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
        centers: list[torch.Tensor] | None = None
        if smooth or center:
            llm.generate(ids, greedy)  # the keys' statistics first
            stats = backend.key_stats
            shape = (cfg.num_kv_heads, cfg.head_dim)
            if center:
                centers = [st.mean if st is not None else torch.zeros(shape) for st in stats]
            ranges = [
                st.amax(centers[i] if centers is not None else None) if st is not None else torch.ones(shape)
                for i, st in enumerate(stats)
            ]
            candidates = {f"int8~{a:g}": [smoothing_vectors(r, a, shared=cfg.qk_norm) for r in ranges] for a in smooth_alphas} if smooth else {}
            backend.measure_transformed(centers, candidates)
        llm.generate(ids, greedy)
        identity = llm.engine.weights_identity
    finally:
        llm.close()
    measured = backend.errors.relative()
    errors = {f: measured[f] for f in formats}
    result = Measurement(errors, backend.errors.tokens, identity)
    result.candidates = {n: e for n, e in measured.items() if n not in formats}
    if smooth:
        result.candidates["int8~0"] = list(errors["int8"])
    if centers is not None:
        result.k_mean = {i: c.tolist() for i, c in enumerate(centers)}
    # Each format's error per layer is its best candidate's: centered or not (a shift
    # by the mean can hurt a channel whose keys mostly sit at zero), and for int8 the
    # smoothings (all centered).
    for fmt in formats:
        result.centered[fmt] = set()
        for layer in range(cfg.num_layers):
            options = {fmt: measured[fmt][layer]}
            if fmt == "int8":
                options |= {name: measured[name][layer] for name in backend.smoothed}
            if centers is not None:
                options[f"{fmt}~raw"] = measured[f"{fmt}~raw"][layer]
            best = min(options, key=lambda n: options[n])
            errors[fmt][layer] = options[best]
            if centers is not None and best != f"{fmt}~raw":
                result.centered[fmt].add(layer)
            if best in backend.smoothed:
                result.k_smooth[layer] = backend.smoothed[best][layer].tolist()
                result.k_smooth_alpha[layer] = float(best.split("~")[1])
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
    parser.add_argument("--no-k-centering", action="store_true", help="do not center the keys of quantized layers")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    alphas = [] if args.no_k_smoothing else list(CALIBRATION_ALPHAS)
    found = measure(
        args.model, read_prompts(args.prompts), args.device, args.dtype, formats, smooth_alphas=alphas, center=not args.no_k_centering
    )
    layers, threshold = choose_plan(found.errors, args.threshold, max_skip_fraction=args.max_skip_fraction)
    plan = found.plan(layers, threshold)
    plan.save(args.out)
    print(f"measured {found.tokens} tokens over {len(layers)} layers; threshold {threshold:.4g}")
    for i, fmt in enumerate(layers):
        row = "  ".join(f"{f}={found.errors[f][i]:.4f}" for f in found.errors)
        notes = []
        if i in plan.k_center:
            notes.append(f"K centering; uncentered {fmt} {found.candidates[f'{fmt}~raw'][i]:.4f}")
        if i in plan.k_smooth:
            unsmoothed = "centered unsmoothed" if found.k_mean else "unsmoothed"
            notes.append(f"K smoothing, alpha {plan.k_smooth_alpha[i]:g}; {unsmoothed} int8 {found.candidates['int8~0'][i]:.4f}")
        print(f"layer {i:3d}: {row}  -> {fmt}" + (f"  ({'; '.join(notes)})" if notes else ""))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
