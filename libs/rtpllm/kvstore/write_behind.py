"""Write-behind: a background thread writing blocks to one tier, never blocking the caller.

The queue is bounded by bytes. `submit` takes what fits and drops the rest at once,
counting each dropped block in the tier's `dropped_writes`: a slow or stalled tier
costs cache hits later, never latency now. One writer per tier, so a stalled Redis does
not hold back demotions to SSD.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from rtpllm.kvstore.tier import Tier

log = logging.getLogger(__name__)


class WriteBehind:
    """Queue + thread in front of `tier.put_many`; batches of up to `max_batch` blocks.

    Counters: `submitted` (queued), `dropped` (queue full or closing), `done` (handed to
    the tier, which may still drop them, e.g. while Redis is down: see its stats),
    `failed` (the tier raised).
    """

    def __init__(self, tier: Tier, max_pending_bytes: int, max_batch: int = 16) -> None:
        self.tier = tier
        self.max_pending_bytes = max_pending_bytes
        self.max_batch = max(1, max_batch)
        self.submitted = 0
        self.done = 0
        self.dropped = 0
        self.failed = 0
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self._pending_bytes = 0
        self._in_flight = 0
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"kvstore-write-{tier.name}", daemon=True)
        self._thread.start()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def submit(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        """Queue what fits (in order); drop the rest. Returns how many were queued."""
        queued = dropped = 0
        with self._cond:
            for key, data in items:
                if self._closing or self._pending_bytes + len(data) > self.max_pending_bytes:
                    dropped += 1
                    continue
                self._queue.append((key, data))
                self._pending_bytes += len(data)
                queued += 1
            self.submitted += queued
            self.dropped += dropped
            if queued:
                self._cond.notify_all()
        if dropped:
            self.tier.stats.add(dropped_writes=dropped)
        return queued

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is written (or failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._in_flight, timeout)

    def close(self, timeout: float) -> bool:
        """Flush (bounded by `timeout`), then stop the thread. Blocks still queued after
        the timeout are dropped and counted. Returns True if everything was written."""
        deadline = time.monotonic() + timeout
        flushed = self.flush(timeout)
        with self._cond:
            self._closing = True
            abandoned = len(self._queue)
            self._pending_bytes -= sum(len(d) for _, d in self._queue)
            self._queue.clear()
            self.dropped += abandoned
            self._cond.notify_all()
        if abandoned:
            self.tier.stats.add(dropped_writes=abandoned)
            log.warning(
                "kvstore: %d blocks for the %s tier not written before close", abandoned, self.tier.name
            )
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return flushed and not abandoned

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "submitted": self.submitted,
                "done": self.done,
                "dropped": self.dropped,
                "failed": self.failed,
                "pending": len(self._queue) + self._in_flight,
                "pending_bytes": self._pending_bytes,
            }

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return  # closing and drained
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                self._in_flight = len(batch)
            ok = True
            try:
                self.tier.put_many(batch)
            except Exception:
                ok = False
                log.exception("kvstore: writing %d blocks to the %s tier failed", len(batch), self.tier.name)
            with self._cond:
                self._in_flight = 0
                self._pending_bytes -= sum(len(d) for _, d in batch)
                if ok:
                    self.done += len(batch)
                else:
                    self.failed += len(batch)
                self._cond.notify_all()
