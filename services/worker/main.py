"""Entry point of the combined worker: load the engine, serve it over NATS, drain on
SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

from rtpllm.serving.bus import connect_nats
from rtpllm.serving.dependencies import RedisCheck
from rtpllm.serving.engine_info import engine_info
from rtpllm.serving.engine_server import EngineServer, EngineServerConfig
from rtpllm.serving.kv_events import KVEventPublisher
from rtpllm.serving.settings import WorkerSettings, new_id

log = logging.getLogger("rtpllm.worker")

# `rtpllm up` waits for this line (and the gateway's /ready) before it calls a worker ready.
READY_LINE = "worker ready"


def seconds_since_process_start() -> float:
    """Wall time since this process was started (Linux /proc; falls back to 0)."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class LoadProgressLog:
    """Logs weight-loading progress every few seconds (the loader calls it from its thread)."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9) / 1e9
        log.info("loading weights: %.2f / %.2f GB (%.1f GB/s)", done / 1e9, total / 1e9, rate)


async def serve(settings: WorkerSettings) -> int:
    from rtpllm.engine.async_engine import AsyncLLMEngine  # torch: only workers pay for it

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    instance_id = settings.instance_id or new_id("worker")

    if settings.redis_url:
        redis = RedisCheck(settings.redis_url)
        log.info("redis %s: %s", settings.redis_url, await redis.status())
        await redis.close()
    nc = await connect_nats(settings.nats_url, f"rtpllm-{instance_id}", settings.nats_connect_timeout_s)
    kv_events = KVEventPublisher(nc, loop, instance_id, model="")
    log.info("loading %s on %s ...", settings.engine.model, settings.engine.device)
    load = asyncio.create_task(
        AsyncLLMEngine.create(settings.engine, on_kv_events=kv_events, engine_id=instance_id, load_progress=LoadProgressLog())
    )
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not load.done():
        log.info("stopped while loading")
        await nc.close()
        return 0
    stopping.cancel()
    engine = load.result()
    info = engine_info(engine)
    kv_events.set_model(info.model)
    config = EngineServerConfig(
        instance_id=instance_id,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        lease_s=settings.lease_s,
        default_gateway_lease_s=settings.lease_s,
    )
    server = EngineServer(nc, engine, info, config, kv_events)
    await server.start()
    log.info(
        "%s: %s serving %r (weights loaded in %.2f s; %.2f s from process start to ready)",
        READY_LINE, instance_id, info.model, engine.engine.load_seconds, seconds_since_process_start(),
    )

    done_wait = [asyncio.create_task(stop.wait()), asyncio.create_task(server.stopped.wait())]
    await asyncio.wait(done_wait, return_when=asyncio.FIRST_COMPLETED)
    for task in done_wait:
        task.cancel()
    engine_died = server.stopped.is_set()
    log.info("stopping: draining %d running request(s) for up to %.0f s", server.num_running, settings.drain_timeout_s)
    await server.drain(0 if engine_died else settings.drain_timeout_s)
    await engine.shutdown()
    with contextlib.suppress(Exception):
        await nc.drain()
    log.info("stopped")
    return 1 if engine_died else 0


def run(settings: WorkerSettings) -> int:
    return asyncio.run(serve(settings))
