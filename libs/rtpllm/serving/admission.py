"""Admission control: a bounded number of sequences in flight and a bounded FIFO queue in
front of them. Beyond both, a request is refused at once (HTTP 429 with Retry-After)
instead of waiting without bound (ARCHITECTURE rule 3).

A request weighs the sequences it will run: one per prompt per sample (`prompts x n`),
so a /v1/completions batch of 20 prompts with n=4 takes 80 slots, not one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass


class Overloaded(RuntimeError):
    """The queue is full; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the server is overloaded: too many requests are queued; retry later")
        self.retry_after_s = retry_after_s


@dataclass
class _Waiter:
    future: asyncio.Future[None]
    seqs: int


class AdmissionController:
    """At most `max_running` admitted sequences and `max_queued` sequences waiting.

    Waiting is FIFO, by request: a request waits until its whole weight fits, and the
    ones behind it wait too (no overtaking, so a large request is not starved). A waiter
    that is cancelled (deadline, client gone) leaves the queue and, if its slots were
    already handed to it, passes them on.
    """

    def __init__(self, max_running: int, max_queued: int, retry_after_s: int = 1) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.running = 0  # sequences admitted
        self.queued = 0  # sequences waiting
        self._waiters: deque[_Waiter] = deque()

    @asynccontextmanager
    async def admit(self, seqs: int = 1) -> AsyncIterator[None]:
        """Hold `seqs` slots for the body of the `async with`; raises Overloaded if they
        cannot be waited for."""
        await self.acquire(seqs)
        try:
            yield
        finally:
            self.release(seqs)

    async def acquire(self, seqs: int = 1) -> None:
        """Take `seqs` slots, waiting in line if the queue has room; raises Overloaded if
        not. Pair with exactly one `release(seqs)`."""
        if not 1 <= seqs <= self.max_running:
            raise ValueError(f"a request may take 1 to {self.max_running} slots, not {seqs}")
        if not self._waiters and self.running + seqs <= self.max_running:
            self.running += seqs
            return
        if self.queued + seqs > self.max_queued:
            raise Overloaded(self.retry_after_s)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), seqs)
        self._waiters.append(waiter)
        self.queued += seqs
        try:
            await waiter.future  # _wake() hands the slots over: `running` counts them already
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(seqs)  # the slots arrived just as we gave up: pass them on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                    self.queued -= seqs
                self._wake()  # it may have been the head that held the others back
            raise

    def release(self, seqs: int = 1) -> None:
        """Give `seqs` slots back: to the waiters in order, as far as they fit."""
        self.running -= seqs
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():  # cancelled, not yet removed by its own task
                self._waiters.popleft()
                self.queued -= head.seqs
                continue
            if self.running + head.seqs > self.max_running:
                return
            self._waiters.popleft()
            self.queued -= head.seqs
            self.running += head.seqs
            head.future.set_result(None)
