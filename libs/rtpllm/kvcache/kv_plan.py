"""Per-layer KV-cache plans: the JSON file the calibration writes and the engine loads.

    {
      "version": 1,
      "model": "<weights identity or name>",
      "num_layers": 30,
      "layers": ["fp8", "auto", "int8", ...],      # one per layer: auto | bf16 | fp8 | int8
      "threshold": 0.02,                            # what the calibration chose by
      "errors": {"fp8": [...], "int8": [...]}       # measured per layer (informative)
    }

"auto" keeps a layer in the model's dtype. The engine resolves a plan together with
--kv-cache-dtype and --kv-cache-dtype-skip-layers into a `KVCacheSpec` (`cache_spec`).
"""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        for i, fmt in enumerate(self.layers):
            if fmt not in KV_CACHE_DTYPES:
                raise ValueError(f"KV cache plan: layer {i} has format {fmt!r}; use one of {', '.join(KV_CACHE_DTYPES)}")

    def to_json(self) -> str:
        doc = {
            "version": PLAN_VERSION,
            "model": self.model,
            "num_layers": len(self.layers),
            "layers": list(self.layers),
            "threshold": self.threshold,
            "errors": self.errors,
        }
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
        return cls(
            tuple(doc["layers"]),
            model=str(doc.get("model", "")),
            threshold=doc.get("threshold"),
            errors={k: list(v) for k, v in (doc.get("errors") or {}).items()},
        )


def cache_spec(cache: CacheConfig, num_layers: int, model_dtype: torch.dtype) -> KVCacheSpec:
    """The engine's per-layer KV formats from its cache options (plan file included)."""
    plan: Sequence[str] | None = None
    if cache.kv_cache_plan:
        plan = KVCachePlan.load(cache.kv_cache_plan).layers
    return KVCacheSpec.resolve(num_layers, model_dtype, cache.kv_cache_dtype, cache.kv_cache_dtype_skip_layers, plan)
