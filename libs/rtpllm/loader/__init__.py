"""Checkpoint loading into pre-allocated model parameters.

`load_checkpoint_fast` is what engines use (file-order extents, parallel reads,
overlapped host-to-device copies); `load_checkpoint` is the simple reference it is
tested against. Exports load lazily so torch-free users (GGUF conversion, model
resolution in a gateway) do not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "load_checkpoint_fast": "rtpllm.loader.fast_loader",
    "ProgressPrinter": "rtpllm.loader.progress",
    "CheckpointError": "rtpllm.loader.weights",
    "LoadStats": "rtpllm.loader.weights",
    "load_checkpoint": "rtpllm.loader.weights",
    "safetensors_files": "rtpllm.loader.weights",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rtpllm.loader' has no attribute {name!r}")
    return getattr(import_module(module), name)
