"""The activation functions HF vision configs name (`hidden_act`), as modules."""

from __future__ import annotations

import torch
from torch import nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation the CLIP-style ViTs (Qwen2-VL's) trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """The module for an HF `hidden_act` name; ValueError for one we do not implement."""
    if name == "quick_gelu":
        return QuickGELU()
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return nn.GELU(approximate="tanh")
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unsupported vision activation {name!r}")
