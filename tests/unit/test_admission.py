"""The bounded admission queue: FIFO, refusal when full, slots passed on when waiters leave."""

from __future__ import annotations

import asyncio

import pytest

from rtpllm.serving.admission import AdmissionController, Overloaded


async def test_fifo_and_refusal() -> None:
    adm = AdmissionController(max_running=1, max_queued=2, retry_after_s=7)
    order: list[int] = []
    gate = asyncio.Event()

    async def job(i: int) -> None:
        async with adm.admit():
            order.append(i)
            await gate.wait()

    first = asyncio.create_task(job(0))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(job(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    assert (adm.running, adm.queued) == (1, 2)
    with pytest.raises(Overloaded) as info:
        await adm.acquire()
    assert info.value.retry_after_s == 7
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, *waiting), 2)
    assert order == [0, 1, 2]
    assert (adm.running, adm.queued) == (0, 0)


async def test_cancelled_waiter_leaves_and_slot_is_passed_on() -> None:
    adm = AdmissionController(max_running=1, max_queued=5)
    await adm.acquire()
    quitter = asyncio.create_task(adm.acquire())
    stayer = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    quitter.cancel()
    await asyncio.sleep(0)
    assert adm.queued == 1
    adm.release()
    await asyncio.wait_for(stayer, 1)
    assert (adm.running, adm.queued) == (1, 0)
    adm.release()
    assert adm.running == 0


async def test_slot_handed_to_a_waiter_that_gives_up_is_not_lost() -> None:
    adm = AdmissionController(max_running=1, max_queued=5)
    await adm.acquire()
    late = asyncio.create_task(adm.acquire())
    nxt = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    adm.release()  # hands the slot to `late`...
    late.cancel()  # ...which is cancelled before it runs
    await asyncio.sleep(0)
    await asyncio.wait_for(nxt, 1)
    assert adm.running == 1
    adm.release()
    assert adm.running == 0


def test_bad_limits() -> None:
    with pytest.raises(ValueError):
        AdmissionController(0, 1)


async def test_requests_weigh_their_sequences() -> None:
    adm = AdmissionController(max_running=8, max_queued=8, retry_after_s=3)
    await adm.acquire(6)  # a batch of 3 prompts x n=2
    assert adm.running == 6
    big = asyncio.create_task(adm.acquire(4))  # does not fit next to it: waits
    await asyncio.sleep(0)
    assert (adm.running, adm.queued) == (6, 4)
    small = asyncio.create_task(adm.acquire(1))  # would fit, but does not overtake
    await asyncio.sleep(0)
    assert (adm.running, adm.queued) == (6, 5) and not small.done()
    with pytest.raises(Overloaded) as info:
        await adm.acquire(4)  # 5 + 4 sequences would wait: more than max_queued
    assert info.value.retry_after_s == 3
    adm.release(6)
    await asyncio.wait_for(asyncio.gather(big, small), 1)
    assert (adm.running, adm.queued) == (5, 0)
    adm.release(4)
    adm.release(1)
    assert adm.running == 0
    with pytest.raises(ValueError):
        await adm.acquire(9)  # could never run: the caller refuses it (HTTP 400)


async def test_a_large_waiter_that_leaves_lets_the_ones_behind_it_in() -> None:
    adm = AdmissionController(max_running=4, max_queued=8)
    await adm.acquire(3)
    big = asyncio.create_task(adm.acquire(4))
    small = asyncio.create_task(adm.acquire(1))
    await asyncio.sleep(0)
    assert not small.done()
    big.cancel()
    await asyncio.wait_for(small, 1)
    assert (adm.running, adm.queued) == (4, 0)
