"""Model definitions and the factory that builds one from an HF-format directory.

Only the torch-free parts (config, registry) load eagerly: a gateway resolves models and
reads configs without importing torch.
"""

from __future__ import annotations

from typing import Any

from rtpllm.models.config import SUPPORTED_ARCHITECTURES, ModelConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "DecoderLM", "ModelConfig", "build_model", "fill_random"]


def __getattr__(name: str) -> Any:
    if name == "DecoderLM":
        from rtpllm.models.decoder import DecoderLM

        return DecoderLM
    if name in ("build_model", "fill_random"):
        from rtpllm.models import factory

        return getattr(factory, name)
    raise AttributeError(f"module 'rtpllm.models' has no attribute {name!r}")
