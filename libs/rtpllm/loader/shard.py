"""A tensor-parallel rank's load target: a slice of a checkpoint tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Shard:
    """`dest` receives the checkpoint tensor's slice that starts at `start` along `dim`
    and is `dest.shape[dim]` long (every other dimension whole)."""

    dest: torch.Tensor
    dim: int
    start: int


# What a loader's `targets` map a checkpoint name to: the whole tensor's view, or a Shard.
Target = torch.Tensor | Shard
