"""A dependency-free progress line for checkpoint loads: bytes done/total and GB/s on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressPrinter:
    """Callable matching `progress(done_bytes, total_bytes)`; pass it as `progress=ProgressPrinter()`.

    On a terminal it redraws one line in place (at most every `interval` seconds); in a
    log file it writes a line every `log_interval` seconds, so the log stays readable.
    The rate is measured from the first call.
    """

    def __init__(
        self,
        label: str = "loading",
        stream: TextIO | None = None,
        interval: float = 0.1,
        log_interval: float = 5.0,
        width: int = 30,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._interval = interval if self._tty else log_interval
        self._start: float | None = None
        self._last_draw = float("-inf")
        self._finished = False

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self._start is None:
            self._start = now
        finished = done >= total
        if self._finished or (not finished and now - self._last_draw < self._interval):
            return
        self._last_draw = now
        self._finished = finished
        elapsed = max(now - self._start, 1e-9)
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"{self.label} [{bar}] {done / 1e9:.2f}/{total / 1e9:.2f} GB  {done / elapsed / 1e9:.2f} GB/s"
        if self._tty:
            self.stream.write("\r" + line + ("\n" if finished else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
