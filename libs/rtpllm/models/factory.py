"""Building a model object: allocate on the device (no random init), or fill randomly."""

from __future__ import annotations

import torch

from rtpllm.attention import AttentionBackend
from rtpllm.models.config import ModelConfig
from rtpllm.models.decoder import DecoderLM


def build_model(
    config: ModelConfig, backend: AttentionBackend, max_position: int, dtype: torch.dtype, device: str
) -> DecoderLM:
    """An uninitialised model on `device`: parameters are allocated, not filled.

    It is built on the meta device first so no time goes into random initialisation that
    the loader overwrites anyway.
    """
    with torch.device("meta"):
        model = DecoderLM(config, backend, max_position, dtype)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.rotary.build_tables(torch.device(device))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def fill_random(model: DecoderLM, seed: int, std: float = 0.02) -> None:
    """Random weights in place, on the model's device: norms near 1, the rest N(0, std).

    For benchmarks of full-size shapes; the values are plausible enough that activations
    stay finite in bf16.
    """
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=gen)
