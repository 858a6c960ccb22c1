"""Admission control: a bounded number of requests in flight and a bounded FIFO queue in
front of them. Beyond both, a request is refused at once (HTTP 429 with Retry-After)
instead of waiting without bound (ARCHITECTURE rule 3)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Overloaded(RuntimeError):
    """The queue is full; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the server is overloaded: too many requests are queued; retry later")
        self.retry_after_s = retry_after_s


class AdmissionController:
    """At most `max_running` admitted requests and `max_queued` waiting for a slot.

    Waiting is FIFO; a waiter that is cancelled (deadline, client gone) leaves the queue
    and, if a slot was already handed to it, passes the slot on.
    """

    def __init__(self, max_running: int, max_queued: int, retry_after_s: int = 1) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a slot for the body of the `async with`; raises Overloaded if none can be
        waited for."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        """Take a slot, waiting in line if the queue has room; raises Overloaded if not.
        Pair with exactly one `release()`."""
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_queued:
            raise Overloaded(self.retry_after_s)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # _release() hands its slot over: `running` stays counted
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot arrived just as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):  # a release may have skipped it already
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Give a slot back: to the oldest waiter, or to the pool."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1
