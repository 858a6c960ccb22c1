"""Building a model object: allocate on the device (no random init), or fill randomly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from rtpllm.attention import AttentionBackend
from rtpllm.models.config import ModelConfig
from rtpllm.models.decoder import DecoderLM

if TYPE_CHECKING:
    from rtpllm.parallel.group import TPGroup


def build_model(
    config: ModelConfig,
    backend: AttentionBackend,
    max_position: int,
    dtype: torch.dtype,
    device: str,
    group: TPGroup | None = None,
) -> DecoderLM:
    """An uninitialised model on `device`: parameters are allocated, not filled.

    It is built on the meta device first so no time goes into random initialisation that
    the loader overwrites anyway. With a tensor-parallel `group`, only this rank's shard.
    """
    with torch.device("meta"):
        model = DecoderLM(config, backend, max_position, dtype, group)
    allocate_parameters(model, torch.device(device), dtype)
    model.zero_vocab_padding()
    model.rotary.build_tables(torch.device(device))
    return model.eval().requires_grad_(False)


def allocate_parameters(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter and buffer uninitialized memory on `device` (floating
    ones in `dtype`), keeping shared tensors shared.

    `Module.to_empty` does the same through `torch.empty_like`, which on meta tensors runs
    torch's reference implementation and imports sympy with it: 0.2 s of an engine
    start, seconds on the GPU machine (docs/benchmarks.md).
    """
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, old in table.items():
                if old is None:
                    continue
                new = made.get(id(old))
                if new is None:
                    data = torch.empty(
                        old.shape, dtype=dtype if old.is_floating_point() else old.dtype, device=device
                    )
                    new = nn.Parameter(data, requires_grad=False) if isinstance(old, nn.Parameter) else data
                    made[id(old)] = new
                table[name] = new


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
    model.zero_vocab_padding()
