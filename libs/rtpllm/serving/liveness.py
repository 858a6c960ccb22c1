"""Liveness that a busy event loop cannot fake or starve, for gateways and engine servers.

Two pieces, used together by `Dispatcher` (gateway) and `EngineServer` (engines):

- `LoopWatch` measures how late this process's own event loop runs, and keeps a clock
  that stops while the loop is stalled. Peers' leases are judged on that clock: if we
  could not read their heartbeats (parsing a huge body, a long GIL-holding call), the
  stall is not counted as their silence. Heartbeats that queued up meanwhile are read
  right after, and renew the leases before they can run out.
- `HeartbeatThread` publishes this process's own heartbeats from a thread with its own
  event loop and its own NATS connection, so a stalled main loop still renews our lease
  with every peer. It stops beating only when the main loop has been stalled for longer
  than `max_stall_s`: a process that hangs for good must still lose its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable

from nats.aio.client import Client as NATS

from rtpllm.serving.bus import connect_like

log = logging.getLogger(__name__)


class LoopWatch:
    """Ticks every `period_s` on the event loop it was started on and measures the lag.

    `clock()` is monotonic time minus the time the loop spent stalled, where a stall is
    lag beyond `tolerance_s` (scheduling noise on a busy host is not a stall). It also
    counts a stall still in progress, so the result is right whichever callback runs
    first when the loop frees. Call `clock()` on the loop; `lag_s()` from any thread.
    """

    def __init__(
        self, period_s: float = 0.1, tolerance_s: float = 0.05, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.period_s = period_s
        self.tolerance_s = tolerance_s
        self._now = clock
        self._last_tick = clock()
        self._stalled_s = 0.0  # total stall of finished ticks
        self.max_lag_s = 0.0  # the longest lag seen (for logs and tests)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._last_tick = self._now()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-watch")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _ongoing(self, now: float) -> float:
        if self._task is None:
            return 0.0
        return max(0.0, now - self._last_tick - self.period_s - self.tolerance_s)

    def clock(self) -> float:
        """Seconds on a clock that stands still while the loop is stalled."""
        now = self._now()
        return now - self._stalled_s - self._ongoing(now)

    def lag_s(self) -> float:
        """How long the loop has gone without running its tick past its due time (safe
        from any thread: two float reads)."""
        return max(0.0, self._now() - self._last_tick - self.period_s)

    def tick(self) -> None:
        """Record that the loop ran now (the watch task calls this every period)."""
        now = self._now()
        lag = now - self._last_tick - self.period_s
        if lag > self.tolerance_s:
            self._stalled_s += lag - self.tolerance_s
            if lag > 1.0:
                log.warning("the event loop was stalled for %.1f s; peers' leases were held meanwhile", lag)
        self.max_lag_s = max(self.max_lag_s, lag)
        self._last_tick = now

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            self.tick()


class HeartbeatThread:
    """Publishes `build()` on `subject` every `interval_s`, from its own thread.

    `build` runs on that thread, so it must be safe to call from any thread (reading a
    few attributes is). The connection is a second one to the servers of `nc`
    (`connect_like`), so heartbeats never wait on the owner's event loop; peers see them
    even while it is blocked. With a `watch`, no heartbeat goes out while the owner's
    loop has been stalled for more than `max_stall_s`: peers then drop us after their
    lease, as for a dead process, and re-admit us with our next heartbeat if the loop
    recovers.
    """

    def __init__(
        self,
        nc: NATS,
        subject: str,
        build: Callable[[], bytes],
        interval_s: float,
        name: str,
        watch: LoopWatch | None = None,
        max_stall_s: float = 30.0,
    ) -> None:
        self._owner_nc = nc
        self._subject = subject
        self._build = build
        self._interval_s = interval_s
        self._name = name
        self._watch = watch
        self._max_stall_s = max_stall_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: NATS | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._withheld = False
        self.sent = 0

    async def start(self, timeout_s: float = 15.0) -> None:
        """Start the thread; returns once its connection is up and the first heartbeat
        is out (so the caller is registered with every peer that listens)."""
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        ready = await asyncio.to_thread(self._ready.wait, timeout_s)
        if self._error is not None:
            raise ConnectionError(f"{self._name}: {self._error}") from self._error
        if not ready:
            raise ConnectionError(f"{self._name}: no NATS connection within {timeout_s:g} s")

    async def beat(self) -> None:
        """Publish one heartbeat now and wait until NATS has it (a state change, or an
        answer to a Discover). A no-op once stopped."""
        loop, nc = self._loop, self._nc
        if loop is None or nc is None or self._stopping:
            return
        publish = self._publish(nc, flush=True)
        try:
            future = asyncio.run_coroutine_threadsafe(publish, loop)
        except RuntimeError:  # its loop closed meanwhile
            publish.close()
            return
        await asyncio.wrap_future(future)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop beating and close the connection; no heartbeat goes out after this returns."""
        self._stopping = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(), or logged once running
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.exception("%s stopped", self._name)

    async def _main(self) -> None:
        nc = await connect_like(self._owner_nc, self._name)
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._nc = nc
        try:
            await self._publish(nc, flush=True)
            self._ready.set()
            while not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval_s)
                self._wake.clear()
                if not self._stopping:
                    await self._publish(nc)
        finally:
            self._nc = None
            with contextlib.suppress(Exception):
                await nc.flush(timeout=1)
            with contextlib.suppress(Exception):
                await nc.close()

    async def _publish(self, nc: NATS, flush: bool = False) -> None:
        if self._watch is not None and self._watch.lag_s() > self._max_stall_s:
            if not self._withheld:
                self._withheld = True
                log.error(
                    "the event loop has been stalled for %.0f s (> %.0f s): withholding heartbeats, so peers drop this process",
                    self._watch.lag_s(), self._max_stall_s,
                )  # fmt: skip
            return
        if self._withheld:
            self._withheld = False
            log.warning("the event loop runs again: heartbeats resume")
        try:
            await nc.publish(self._subject, self._build())
            if flush:
                await nc.flush(timeout=2)
            self.sent += 1
        except Exception as exc:  # NATS reconnecting, or build() failed: the next beat will do
            log.warning("%s: heartbeat not sent: %s", self._name, exc)
