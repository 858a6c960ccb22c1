"""The event-loop watch: a lease clock that stands still while the loop is stalled."""

from __future__ import annotations

import asyncio
import time

import pytest

from rtpllm.serving.liveness import LoopWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_clock_stops_during_a_stall_whichever_callback_runs_first() -> None:
    clock = Clock()
    watch = LoopWatch(period_s=0.1, tolerance_s=0.05, clock=clock)
    watch.start()
    try:
        start = watch.clock()
        clock.now += 0.1
        watch.tick()  # on time
        assert watch.clock() == pytest.approx(start + 0.1)
        clock.now += 10.0  # the loop is blocked for ~10 s: the lease clock moves only by the tolerance
        during = watch.clock()
        assert during == pytest.approx(start + 0.1 + 0.1 + 0.05)
        assert watch.lag_s() == pytest.approx(9.9)
        # Read before the watch's own tick has run (a lease check scheduled first) ...
        assert watch.clock() == during
        watch.tick()
        # ... or after: the same, and it runs on from there.
        assert watch.clock() == pytest.approx(during)
        clock.now += 0.1
        assert watch.clock() == pytest.approx(during + 0.1)
        assert watch.max_lag_s == pytest.approx(9.9)
    finally:
        watch.stop()


async def test_real_loop_stall_is_measured() -> None:
    watch = LoopWatch(period_s=0.02, tolerance_s=0.02)
    watch.start()
    try:
        await asyncio.sleep(0.05)
        before_wall, before = time.monotonic(), watch.clock()
        time.sleep(0.5)  # block the loop
        await asyncio.sleep(0.05)
        wall = time.monotonic() - before_wall
        assert watch.max_lag_s >= 0.4
        assert watch.clock() - before < wall - 0.35, "the stall was not counted"
    finally:
        watch.stop()
