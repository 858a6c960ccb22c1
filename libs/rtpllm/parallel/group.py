"""The torch.distributed groups of one tensor-parallel engine, and its two collectives.

Three groups over the same ranks:
- the device group (NCCL on CUDA, gloo on CPU) carries the model's collectives: an
  all-reduce after each row-parallel matmul and the vocabulary embedding, an all-gather
  of the LM head's logits. On CUDA these are captured in the decode CUDA graphs.
- the control group (always gloo, on the host) carries what rank 0 tells the others:
  each step's inputs, the KV pool's size, stop. Its timeout is effectively infinite
  because workers wait on it while the engine is idle, for as long as that lasts; a
  dead peer still ends every wait at once (gloo sees the socket close).
- the KV group (always gloo, on the host, the control group's timeout) carries KV blocks
  between the ranks' pools and rank 0 for the PD data plane (engine/tp_kv.py). Its own
  group, served by a thread of each worker, so a transfer never waits for a step and a
  step never waits for a transfer.

One engine per process: torch.distributed's default group is process-wide, so the
engine owns it from `init_tp_group` to `TPGroup.destroy`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Model collectives wait only for the other ranks to reach the same point of the same
# step (milliseconds apart); a peer that hangs that long is broken.
DEVICE_TIMEOUT = datetime.timedelta(minutes=5)
# Workers wait on the control group between steps, however long the engine is idle.
CONTROL_TIMEOUT = datetime.timedelta(days=365)
# torch 2.13 renamed all_gather_into_tensor (the old name warns); 2.11 has only the old.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class TPGroup:
    """This process's rank in a tensor-parallel group and the groups to reach the others."""

    rank: int
    size: int
    device_group: dist.ProcessGroup
    control_group: dist.ProcessGroup
    kv_group: dist.ProcessGroup

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (row-parallel partial products)."""
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] per rank -> [N, size * C], rank r's columns at [r * C, (r + 1) * C)
        (vocabulary-parallel logits). Every rank calls it with the same N."""
        rows, cols = x.shape
        if rows == 0:
            return x.new_empty((0, cols * self.size))
        out = x.new_empty((self.size * rows, cols))
        _all_gather(out, x.contiguous(), group=self.device_group)
        return out.view(self.size, rows, cols).transpose(0, 1).reshape(rows, self.size * cols)

    def broadcast_control(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's host tensor `x` into every rank's `x` (same shape and dtype everywhere)."""
        dist.broadcast(x, src=0, group=self.control_group)
        return x

    def min_control(self, value: int) -> int:
        """The smallest of every rank's `value` (KV pool size: the tightest rank decides)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(t.item())

    def destroy(self) -> None:
        """Leave the groups (every group of this process: it holds one engine)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def init_tp_group(rank: int, size: int, store: dist.Store, device: str) -> TPGroup:
    """Join the group of `size` ranks that rendezvous at `store` (a TCPStore: rank 0
    hosts it, the others connect to MASTER_ADDR:MASTER_PORT as torchrun sets them)."""
    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a torch.distributed group; one tensor-parallel engine per process"
        )
    cuda = device.startswith("cuda")
    dist.init_process_group(
        "nccl" if cuda else "gloo", store=store, rank=rank, world_size=size, timeout=DEVICE_TIMEOUT
    )
    # Every rank creates the groups in this order (new_group is collective).
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    kv = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TPGroup(rank, size, dist.group.WORLD, control, kv)  # type: ignore[arg-type]
