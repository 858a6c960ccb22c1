"""Per-layer KV-cache plans: the JSON file the calibration writes and the engine loads.

    {
      "version": 1,
      "model": "<weights identity or name>",
      "num_layers": 30,
      "layers": ["fp8", "auto", "int8", ...],      # one per layer: auto | bf16 | fp8 | int8
      "threshold": 0.02,                            # what the calibration chose by
      "errors": {"fp8": [...], "int8": [...]},      # measured per layer (informative)
      "k_smooth": {"0": [[...head_dim], ...]},      # optional: per layer, one vector per KV head
      "k_smooth_alpha": {"0": 0.75},                # what each vector was made with (informative)
      "k_center": {"0": [[...head_dim], ...]}       # optional: per layer, one vector per KV head
    }

"auto" keeps a layer in the model's dtype. `k_smooth` holds the per-channel K smoothing
vectors the calibration chose (rtpllm.models.k_smoothing): the engine folds them into
the model's q/k projections. `k_center` holds the K centering shifts
(rtpllm.models.k_centering): the engine subtracts them from the rotated keys. Both
change the stored keys (k / s - m), so their digest joins the block-key namespace. The
engine resolves a plan together with --kv-cache-dtype and --kv-cache-dtype-skip-layers
into a `KVCacheSpec` (`cache_spec`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rtpllm.config import KV_CACHE_DTYPES, CacheConfig
from rtpllm.kvcache.kv_format import KVCacheSpec

PLAN_VERSION = 1


@dataclass(frozen=True)
class KVCachePlan:
    """A per-layer choice of KV format, with the errors it was chosen from."""

    layers: tuple[str, ...]
    model: str = ""
    threshold: float | None = None
    errors: dict[str, list[float]] = field(default_factory=dict)
    k_smooth: dict[int, list[list[float]]] = field(default_factory=dict)
    k_smooth_alpha: dict[int, float] = field(default_factory=dict)
    k_center: dict[int, list[list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, fmt in enumerate(self.layers):
            if fmt not in KV_CACHE_DTYPES:
                raise ValueError(f"KV cache plan: layer {i} has format {fmt!r}; use one of {', '.join(KV_CACHE_DTYPES)}")
        for what, vectors in (("K smoothing", self.k_smooth), ("K centering", self.k_center)):
            for i, rows in vectors.items():
                if not 0 <= i < len(self.layers):
                    raise ValueError(f"KV cache plan: {what} for layer {i}, but the plan has {len(self.layers)} layers")
                if not rows or any(not isinstance(r, list) or len(r) != len(rows[0]) for r in rows):
                    raise ValueError(f"KV cache plan: layer {i}'s {what} is not a list of equal-length vectors")

    def smoothing_vectors(self) -> dict[int, torch.Tensor]:
        """Layer -> [Hkv, D] fp32 vectors (checked against the model when folded)."""
        return {i: torch.tensor(rows, dtype=torch.float32) for i, rows in sorted(self.k_smooth.items())}

    def centering_vectors(self) -> dict[int, torch.Tensor]:
        """Layer -> [Hkv, D] fp32 K shifts (checked against the model when set)."""
        return {i: torch.tensor(rows, dtype=torch.float32) for i, rows in sorted(self.k_center.items())}

    def k_transform_id(self) -> str:
        """A digest of the key transforms ("" without any): stored keys depend on them."""
        if not self.k_smooth and not self.k_center:
            return ""
        doc = {
            "smooth": {str(i): self.k_smooth[i] for i in sorted(self.k_smooth)},
            "center": {str(i): self.k_center[i] for i in sorted(self.k_center)},
        }
        return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        doc = {
            "version": PLAN_VERSION,
            "model": self.model,
            "num_layers": len(self.layers),
            "layers": list(self.layers),
            "threshold": self.threshold,
            "errors": self.errors,
        }
        if self.k_smooth:
            doc["k_smooth"] = {str(i): self.k_smooth[i] for i in sorted(self.k_smooth)}
            doc["k_smooth_alpha"] = {str(i): a for i, a in sorted(self.k_smooth_alpha.items())}
        if self.k_center:
            doc["k_center"] = {str(i): self.k_center[i] for i in sorted(self.k_center)}
        return json.dumps(doc, indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> KVCachePlan:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the KV cache plan {path}: {exc}") from None
        if doc.get("version") != PLAN_VERSION or not isinstance(doc.get("layers"), list):
            raise ValueError(f"{path} is not a version-{PLAN_VERSION} KV cache plan (no 'layers' list)")
        try:
            k_smooth = {int(i): [list(map(float, r)) for r in rows] for i, rows in (doc.get("k_smooth") or {}).items()}
            k_smooth_alpha = {int(i): float(a) for i, a in (doc.get("k_smooth_alpha") or {}).items()}
            k_center = {int(i): [list(map(float, r)) for r in rows] for i, rows in (doc.get("k_center") or {}).items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: 'k_smooth' and 'k_center' must map layer numbers to lists of vectors ({exc})") from None
        return cls(
            tuple(doc["layers"]),
            model=str(doc.get("model", "")),
            threshold=doc.get("threshold"),
            errors={k: list(v) for k, v in (doc.get("errors") or {}).items()},
            k_smooth=k_smooth,
            k_smooth_alpha=k_smooth_alpha,
            k_center=k_center,
        )


def load_plan(cache: CacheConfig) -> KVCachePlan | None:
    """The plan file the cache options name, if any."""
    return KVCachePlan.load(cache.kv_cache_plan) if cache.kv_cache_plan else None


def cache_spec(cache: CacheConfig, num_layers: int, model_dtype: torch.dtype, plan: KVCachePlan | None) -> KVCacheSpec:
    """The engine's per-layer KV formats from its cache options and `plan`, the plan
    file they name (`load_plan`; loaded once by the caller, which also applies its key
    transforms to the model)."""
    layers: Sequence[str] | None = plan.layers if plan is not None else None
    k_transform_id = plan.k_transform_id() if plan is not None else ""
    return KVCacheSpec.resolve(
        num_layers, model_dtype, cache.kv_cache_dtype, cache.kv_cache_dtype_skip_layers, layers, k_transform_id
    )
