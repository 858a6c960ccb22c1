"""Issue 14, "Hung Redis", with real processes: the engine's step loop never waits on
the network (ARCHITECTURE rule 8).

One worker with a small host tier over the shared Redis tier (write-through on) serves
16 concurrent decode streams while new requests keep arriving, each of which looks its
prefix up in the tiers (a fresh prompt misses host memory, so Redis is asked). The p99
inter-token latency of the streams is measured with Redis running (the baseline), then
again with redis-server stopped (SIGSTOP) under the same load: it must stay within 1.5x
the baseline, no gap may reach the tiers' 2 s timeout, and every request must complete.
Then SIGCONT. The same with the host's kvstore service stopped instead of Redis.

The figures are printed (`pytest -s`) and recorded in docs/kvstore.md.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest

from bench.serving_bench import StreamLog, stream_request
from rtpllm.runtime.processes import ManagedProcess
from rtpllm.runtime.stack import Stack
from tests.integration.support import MODEL_NAME, auth_headers, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STREAMS = 16
STREAM_PROMPT = 48  # tokens: 3 full blocks of 16
DECODE_TOKENS = 256  # per stream in the warm-up phase; then enough for PHASE_S
PHASE_S = 4.0  # longer than the tiers' 2 s timeouts: a stopped phase sees them expire
ARRIVAL_EVERY_S = 0.15
ARRIVAL_PROMPT = 80  # 5 full blocks: looked up in the tiers when they arrive
MAX_RATIO = 1.5
MAX_GAP_S = 1.5  # below the tiers' 2 s timeouts
# p99 on the shared 2-core VM moves 2-3x between identical phases when other work lands
# on it: a pair over the bound is measured once more (a stall shows in both, and in the
# largest gap, which every pair must keep under MAX_GAP_S).
ATTEMPTS = 2
REDIS_ARGS = ["--kv-host-gib", "0.004", "--kv-redis", "--kv-write-through", "on", "--block-size", "16"]
KVSTORE_ARGS = ["--kvstore", "--kv-write-through", "on", "--block-size", "16"]


@dataclass
class Phase:
    window: tuple[float, float]  # from every stream's first token to the last stream's end
    streams: list[StreamLog]
    arrivals: list[StreamLog]

    def gaps(self) -> list[float]:
        lo, hi = self.window
        return [b - a for s in self.streams for a, b in itertools.pairwise(s.chunks) if a >= lo and b <= hi]

    def itl_ms(self, q: float) -> float:
        gaps = sorted(self.gaps())
        return gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1e3

    def summary(self) -> str:
        ttft = sorted(a.chunks[0] - a.sent for a in self.arrivals if a.chunks)
        return (
            f"ITL p50 {self.itl_ms(0.5):.1f} ms, p99 {self.itl_ms(0.99):.1f} ms, max {max(self.gaps()) * 1e3:.1f} ms "
            f"over {len(self.gaps())} gaps in {self.window[1] - self.window[0]:.1f} s; "
            f"{len(self.arrivals)} arrivals, TTFT p50 {ttft[len(ttft) // 2] * 1e3:.0f} ms, max {ttft[-1] * 1e3:.0f} ms"
        )

    def failures(self) -> list[str]:
        return [s.describe() for s in self.streams + self.arrivals if s.error or not s.finished]


def body(prompt: list[int], max_tokens: int) -> bytes:
    # skip_special_tokens off: random weights sample tokens whose text is empty, for
    # which the gateway would send no chunk (bench/pd_interference.py does the same).
    return json.dumps(
        {
            "model": MODEL_NAME,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
            "skip_special_tokens": False,
        }  # fmt: skip
    ).encode()


async def stream(client: httpx.AsyncClient, data: bytes, log: StreamLog) -> None:
    """One streamed completion, each content chunk stamped on arrival."""
    await stream_request(client, "/v1/completions", data, log)


async def run_phase(stack: Stack, seed: str, fault: Callable[[], None] | None, tokens: int) -> Phase:
    """16 decode streams of `tokens` tokens; once each has its first token, `fault()`
    (if any) and new requests arriving every ARRIVAL_EVERY_S until the streams end."""
    rng = random.Random(seed)
    headers = {**auth_headers(stack), "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=120, limits=limits) as client:
        streams = [StreamLog(time.perf_counter()) for _ in range(STREAMS)]
        tasks = [
            asyncio.create_task(
                stream(client, body([rng.randrange(300) for _ in range(STREAM_PROMPT)], tokens), s)
            )
            for s in streams
        ]
        deadline = time.perf_counter() + 60
        while not all(s.chunks or s.error for s in streams):
            assert time.perf_counter() < deadline, "the streams never started"
            await asyncio.sleep(0.005)
        start = time.perf_counter()
        if fault is not None:
            fault()
        arrivals: list[StreamLog] = []
        arriving: list[asyncio.Task[None]] = []
        while not all(t.done() for t in tasks):
            log = StreamLog(time.perf_counter())
            arrivals.append(log)
            prompt = [rng.randrange(300) for _ in range(ARRIVAL_PROMPT)]
            arriving.append(asyncio.create_task(stream(client, body(prompt, 8), log)))
            await asyncio.sleep(ARRIVAL_EVERY_S)
        end = max(s.chunks[-1] for s in streams if s.chunks)
        await asyncio.wait_for(asyncio.gather(*arriving), 60)
    return Phase((start, end), streams, arrivals)


def measure(
    stack: Stack, victim: Callable[[], ManagedProcess | None], name: str
) -> list[tuple[Phase, Phase]]:
    """The baseline phase, then the same load with `victim` stopped (SIGSTOP), then
    SIGCONT; the pair again (at most ATTEMPTS pairs) while the p99 ratio is over the
    bound. Every pair is printed and returned, the last one decides the ratio."""
    # Warm-up: the prefill speed is learned, the paths are warm, and the phase's length
    # at this machine's speed sets the tokens per stream for PHASE_S.
    warm = asyncio.run(run_phase(stack, f"{name}-warm", None, DECODE_TOKENS))
    scale = PHASE_S / (warm.window[1] - warm.window[0])
    tokens = min(900, max(DECODE_TOKENS, int(DECODE_TOKENS * scale)))  # the model holds 1024
    pairs: list[tuple[Phase, Phase]] = []
    for attempt in range(ATTEMPTS):
        baseline = asyncio.run(run_phase(stack, f"{name}-baseline-{attempt}", None, tokens))
        proc = victim()
        assert proc is not None and proc.alive
        try:
            stopped = asyncio.run(
                run_phase(stack, f"{name}-stopped-{attempt}", partial(proc.signal, signal.SIGSTOP), tokens)
            )
        finally:
            proc.signal(signal.SIGCONT)
        pairs.append((baseline, stopped))
        ratio = stopped.itl_ms(0.99) / baseline.itl_ms(0.99)
        print(f"\n{name} running: {baseline.summary()}\n{name} stopped: {stopped.summary()}")
        print(f"{name}: p99 ITL stopped / running = {ratio:.2f}")
        if ratio <= MAX_RATIO:
            break
    return pairs


def check(stack: Stack, pairs: list[tuple[Phase, Phase]], noticed: str) -> None:
    for baseline, stopped in pairs:
        assert not baseline.failures() and not stopped.failures(), (baseline.failures(), stopped.failures())
        assert len(stopped.gaps()) >= len(baseline.gaps()) // 2
        # The tiers time out after 2 s: a step that waited for one would show as such a
        # gap (too rare to move p99 once the client marks the tier down).
        assert max(stopped.gaps()) < MAX_GAP_S, stopped.summary()
    baseline, stopped = pairs[-1]
    assert stopped.itl_ms(0.99) <= MAX_RATIO * baseline.itl_ms(0.99), (baseline.summary(), stopped.summary())
    # The fault was exercised: the worker's tier calls did reach the stopped process.
    assert stack.config.log_dir is not None
    assert noticed in (stack.config.log_dir / "worker-0.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def redis_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("hung-redis-logs")
    with running_stack(tiny_model, log_dir, workers=1, worker_args=REDIS_ARGS) as stack:
        yield stack


@pytest.fixture(scope="module")
def kvstore_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("hung-kvstore-logs")
    with running_stack(
        tiny_model, log_dir, workers=1, worker_args=KVSTORE_ARGS, use_redis=False, kvstore=True,
        kvstore_args=["--kv-host-gib", "0.05"],
    ) as stack:  # fmt: skip
        yield stack


def test_a_stopped_redis_stalls_no_decode_stream(redis_stack: Stack) -> None:
    check(redis_stack, measure(redis_stack, lambda: redis_stack.redis, "redis"), "unreachable")


def test_a_stopped_kvstore_stalls_no_decode_stream(kvstore_stack: Stack) -> None:
    check(
        kvstore_stack,
        measure(kvstore_stack, lambda: kvstore_stack.kvstore, "kvstore"),
        "kvstore lookup on host",
    )
