"""Where loaded bytes land: raw byte views of destinations, and temporaries for casts.

A "direct" tensor (same dtype as the checkpoint, contiguous view) receives file bytes
straight into its storage through `dest_bytes`; any other tensor is assembled, piece by
piece, in a temporary of the checkpoint dtype on the destination's device and cast into
place when its last piece arrives (on the GPU for CUDA destinations).
"""

from __future__ import annotations

import threading

import torch

from rtpllm.loader.load_plan import LoadPlan, TensorLoad


class CastAssembler:
    """Temporaries for cast (non-direct) tensors: filled piece by piece, cast when complete."""

    def __init__(self, plan: LoadPlan) -> None:
        self._remaining: dict[TensorLoad, int] = {}
        covered: dict[TensorLoad, int] = {}
        for extent in plan.extents:
            for p in extent.pieces:
                if not p.tensor.direct:
                    self._remaining[p.tensor] = self._remaining.get(p.tensor, 0) + 1
                    covered[p.tensor] = covered.get(p.tensor, 0) + p.nbytes
        partial = [t.name for t, n in covered.items() if n != t.nbytes]
        if partial:
            raise ValueError(
                f"plan holds only part of cast tensors {partial[:5]}; a cast needs the whole tensor"
            )
        self._temps: dict[TensorLoad, torch.Tensor] = {}
        self._lock = threading.Lock()

    def temp(self, t: TensorLoad) -> torch.Tensor:
        """The tensor's raw-bytes temporary on the destination's device (created on first use)."""
        with self._lock:
            buf = self._temps.get(t)
            if buf is None:
                buf = self._temps[t] = torch.empty(t.nbytes, dtype=torch.uint8, device=t.dest.device)
            return buf

    def piece_done(self, t: TensorLoad) -> None:
        """Count one piece in; after the last one, cast the temporary into the destination."""
        with self._lock:
            self._remaining[t] -= 1
            buf = self._temps.pop(t) if self._remaining[t] == 0 else None
        if buf is not None:
            t.dest.copy_(buf.view(t.dtype).view(t.shape))


def dest_bytes(t: TensorLoad) -> torch.Tensor:
    """The destination's storage as flat bytes (direct tensors are contiguous)."""
    return t.dest.detach().reshape(-1).view(torch.uint8)


def host_view(buf: torch.Tensor) -> memoryview:
    """A writable memoryview of a CPU uint8 tensor's memory, for os.preadv to fill."""
    return memoryview(buf.numpy())
