"""Entry point of the engine services: the combined worker, and (with `settings.role`)
the prefill and decode instances of the disaggregated topology. Load the engine, add
the role's data-plane side, serve it over NATS, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rtpllm.credentials import redact_url
from rtpllm.protocol.subjects import InstanceRole
from rtpllm.serving.bus import connect_nats
from rtpllm.serving.dependencies import RedisCheck
from rtpllm.serving.engine_info import engine_info
from rtpllm.serving.engine_server import EngineServer, EngineServerConfig
from rtpllm.serving.kv_events import KVEventPublisher
from rtpllm.serving.liveness import LoopWatch
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
    role = InstanceRole(settings.role)
    instance_id = settings.instance_id or new_id(role.value)

    if settings.redis_url:
        redis = RedisCheck(settings.redis_url)
        log.info("redis %s: %s", redact_url(settings.redis_url), await redis.status())
        await redis.close()
    nc = await connect_nats(settings.nats, f"rtpllm-{instance_id}", settings.nats_connect_timeout_s)
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
    try:
        engine = load.result()
    except ValueError as exc:  # a setting the model cannot take (-tp, --max-model-len, ...)
        log.error("cannot serve %s: %s", settings.engine.model, exc)
        log.debug("engine start failed", exc_info=True)
        await nc.close()
        return 2
    info = engine_info(engine)
    kv_events.set_model(info.model)
    config = EngineServerConfig(
        instance_id=instance_id,
        role=role,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        lease_s=settings.lease_s,
        default_gateway_lease_s=settings.lease_s,
    )
    # One clock for every lease this process holds, standing still while its loop stalls.
    watch = LoopWatch()
    sides = await _disaggregation(settings, role, nc, engine, info, instance_id, watch.clock)
    images = await _image_resolver(settings, nc, engine, instance_id, watch.clock)
    server = EngineServer(nc, engine, info, config, kv_events, prefill=sides.prefill, decode=sides.decode, images=images, watch=watch)
    await server.start()
    log.info(
        "%s: %s serving %r (weights loaded in %.2f s; %.2f s from process start to ready)",
        READY_LINE, instance_id, info.model, engine.engine.load_seconds, seconds_since_process_start(),
    )
    health = _health_task(settings.health_file, lambda: nc.is_connected and not server.stopped.is_set(), settings.heartbeat_interval_s)

    done_wait = [asyncio.create_task(stop.wait()), asyncio.create_task(server.stopped.wait())]
    await asyncio.wait(done_wait, return_when=asyncio.FIRST_COMPLETED)
    for task in done_wait:
        task.cancel()
    engine_died = server.stopped.is_set()
    log.info("stopping: draining %d running request(s) for up to %.0f s", server.num_running, settings.drain_timeout_s)
    if health is not None:
        health.cancel()  # not healthy from here on: the file goes
    await server.drain(0 if engine_died else settings.drain_timeout_s)
    await sides.close()
    if images is not None:
        await images.close()
    await engine.shutdown()
    with contextlib.suppress(Exception):
        await nc.drain()
    log.info("stopped")
    return 1 if engine_died else 0


def _health_task(path: str | None, healthy: Callable[[], bool], interval_s: float) -> asyncio.Task[None] | None:
    if not path:
        return None
    from rtpllm.serving.health import keep_fresh

    return asyncio.create_task(keep_fresh(path, healthy, interval_s), name="health-file")


@dataclass
class _Sides:
    """The data-plane ends of a prefill or decode instance (none for a combined worker)."""

    prefill: Any = None
    decode: Any = None
    closers: list[Any] = field(default_factory=list)

    async def close(self) -> None:
        for close in self.closers:
            with contextlib.suppress(Exception):
                await close()


async def _disaggregation(
    settings: WorkerSettings, role: InstanceRole, nc: Any, engine: Any, info: Any, instance_id: str, clock: Callable[[], float]
) -> _Sides:
    sides = _Sides()
    if role is InstanceRole.WORKER:
        return sides
    from rtpllm.transfer import KVReceiver, KVSender

    # Whole blocks; with tensor parallelism the ranks' KV heads pass through this
    # process (rank 0), so cuda_ipc, which writes one pool tensor in place, never applies.
    blocks = engine.kv_blocks
    if not blocks.direct:
        log.info("KV data plane: the %d tensor-parallel ranks' KV heads go through rank 0", engine.engine.tp.size)
    if role is InstanceRole.PREFILL:
        from rtpllm.serving.disagg_prefill import PrefillSide

        sender = KVSender(blocks, prefer=settings.kv_backends)
        sides.closers.append(sender.close)
        sides.prefill = PrefillSide(nc, engine, instance_id, sender, info.block_size)
        return sides
    from rtpllm.serving.disagg_decode import DecodeConfig, DecodeSide

    # CUDA IPC needs the pool on a GPU, in this process; the other backends apply anywhere.
    backends = [b for b in settings.kv_backends if b != "cuda_ipc" or (blocks.is_cuda and blocks.direct)] or ["tcp"]
    receiver = KVReceiver(blocks, host=settings.kv_host, port=settings.kv_port, backends=backends)
    await receiver.start()
    sides.closers.append(receiver.close)
    log.info("KV data plane listening on %s:%d (%s)", receiver.endpoint.host, receiver.endpoint.port, ", ".join(receiver.endpoint.backends))
    config = DecodeConfig(local_prefill_below=settings.local_prefill_below, transfer_lease_s=settings.kv_lease_s)
    sides.decode = DecodeSide(nc, engine, instance_id, info.model, receiver, config, clock)
    return sides


async def _image_resolver(settings: WorkerSettings, nc: Any, engine: Any, instance_id: str, clock: Callable[[], float]) -> Any:
    """Vision-language models: how requests' images become embeddings (the vision
    service when one is alive, with an embedding pool and its data plane; else here)."""
    core = engine.engine
    if core.vision is None:
        return None
    from rtpllm.serving.vision_client import ImageResolver, VisionClient

    client = None
    if settings.embedding_pool_bytes > 0:
        from rtpllm.multimodal.embedding_pool import EmbeddingPool, embedding_namespace
        from rtpllm.transfer import KVReceiver

        hidden = core.model_config.hidden_size
        namespace = embedding_namespace(core.weights_identity, core.dtype, hidden)
        pool = EmbeddingPool.of_bytes(settings.embedding_pool_bytes, hidden, core.dtype, core.device, namespace)
        backends = [b for b in settings.kv_backends if b != "cuda_ipc" or pool.kv.is_cuda] or ["tcp"]
        receiver = KVReceiver(pool.kv, pool.layout, host=settings.kv_host, port=0, backends=backends)
        await receiver.start()
        client = VisionClient(nc, instance_id, pool, receiver, clock=clock)
        await client.start()
        log.info("embedding data plane listening on %s:%d (%d blocks)", receiver.endpoint.host, receiver.endpoint.port, pool.num_blocks)
    runner = core.runner.multimodal
    return ImageResolver(core.vision, core.tokenizer, client, settings.local_encode_below, encoded_here=lambda: runner.images_encoded)


def run(settings: WorkerSettings) -> int:
    return asyncio.run(serve(settings))
