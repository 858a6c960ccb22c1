"""The layers whose forward talks to the other tensor-parallel ranks.

Column-parallel layers (qkv, gate_up, the LM head) need no layer of their own: each rank
holds a plain `Linear` over its output columns (rtpllm.parallel.layout says which). The
two here end in a collective:
- `RowParallelLinear` (o_proj, down_proj): each rank multiplies its slice of the input
  features, and the partial products are summed over the ranks (all-reduce);
- `VocabParallelEmbedding`: each rank looks up the ids in its vocabulary shard, zero
  rows for the others', and the rows are summed over the ranks (all-reduce; exactly one
  rank contributes each row, so the sum is exact).
Without a group (one rank) each is exactly the plain layer: same parameter names
(checkpoints), same computation.

Both hold their parameter directly rather than subclassing `layers.Linear`, so that
`layers` can build them without an import cycle; like those, they are never initialized
(the weights come from a checkpoint or `fill_random`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rtpllm.kernels.gemv import linear

if TYPE_CHECKING:
    from rtpllm.parallel.group import TPGroup


class RowParallelLinear(nn.Module):
    """y = x @ W.T without bias, W [out, this rank's in_features], summed over the ranks."""

    def __init__(self, in_features: int, out_features: int, group: TPGroup | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return self.group.all_reduce(y) if self.group is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding of vocabulary rows [start, start + count) held in a [shard, hidden]
    parameter (rows past `count` are padding, kept zero); lookups are summed over the ranks."""

    def __init__(
        self, shard: int, hidden: int, start: int = 0, count: int | None = None, group: TPGroup | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shard, hidden))
        self.start = start
        self.count = shard if count is None else count
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.count)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        rows.masked_fill_(outside.unsqueeze(-1), 0)
        return self.group.all_reduce(rows)
