"""How long launched device work took, without waiting for it at launch."""

from __future__ import annotations

import time

import torch


class StepClock:
    """How long a launched step's forward pass and sampling took: on CUDA the device
    time between two events (the launch returns long before the GPU is done, and with
    async scheduling the step is read back in a later `step()`), on CPU the wall time
    of the launch, which is the work. Started on construction."""

    def __init__(self, cuda: bool) -> None:
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        if cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._start = time.perf_counter()
        self._seconds = 0.0

    def stop(self) -> None:
        if self._events is not None:
            self._events[1].record()
        else:
            self._seconds = time.perf_counter() - self._start

    def seconds(self) -> float:
        """Once the work is read back (on CUDA this waits for its last kernel)."""
        if self._events is None:
            return self._seconds
        self._events[1].synchronize()
        return self._events[0].elapsed_time(self._events[1]) / 1e3
