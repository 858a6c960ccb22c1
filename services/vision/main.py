"""Entry point of the vision service: load a vision-language model's tower, serve its
engines' encode requests over NATS (queue group) and the data plane, stop on
SIGTERM/SIGINT. The logic is in rtpllm.serving.vision_server; see docs/multimodal.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from rtpllm.serving.bus import connect_nats
from rtpllm.serving.health import keep_fresh
from rtpllm.serving.settings import VisionSettings, new_id

log = logging.getLogger("rtpllm.vision")

# `rtpllm up` and the tests wait for this line.
READY_LINE = "vision ready"


def _load(settings: VisionSettings):  # noqa: ANN202 - torch types stay inside
    """The encoder and its embedding pool (torch, weights: off the event loop)."""
    from rtpllm.config import parse_dtype
    from rtpllm.loader.checkpoint_digest import weights_identity
    from rtpllm.models.registry import cache_root, resolve_model
    from rtpllm.multimodal.embedding_pool import EmbeddingPool, embedding_namespace
    from rtpllm.multimodal.encoder import VisionEncoder

    model_dir = resolve_model(settings.model)
    dtype = parse_dtype(settings.dtype, settings.device)
    seed = settings.seed if settings.load_format == "dummy" else None
    encoder = VisionEncoder.load(model_dir, dtype, settings.device, random_seed=seed)
    # The same identity an engine of these weights computes: both derive the namespace.
    weights = weights_identity(model_dir, cache_root() / "digests", random_seed=seed, device=settings.device)
    namespace = embedding_namespace(weights, dtype, encoder.hidden_size)
    pool = EmbeddingPool.of_bytes(settings.cache_bytes, encoder.hidden_size, dtype, settings.device, namespace)
    return model_dir, encoder, pool


def _has_vision(model: str) -> bool:
    from rtpllm.models.config import ModelConfig
    from rtpllm.models.registry import resolve_model

    return ModelConfig.from_dir(resolve_model(model)).vision is not None


async def serve(settings: VisionSettings) -> int:
    from rtpllm.models.registry import served_model_name
    from rtpllm.serving.vision_server import VisionServer, VisionServerConfig

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    instance_id = settings.instance_id or new_id("vision")
    t0 = time.perf_counter()
    if not await asyncio.to_thread(_has_vision, settings.model):
        # One compose file serves text and vision-language models alike: with a text
        # model this service has nothing to do, and says so instead of failing.
        log.info("%s: %s idle: model %r has no vision tower, nothing to encode", READY_LINE, instance_id, settings.model)
        health = None
        if settings.health_file:
            health = asyncio.create_task(keep_fresh(settings.health_file, lambda: True, settings.heartbeat_interval_s))
        await stop.wait()
        if health is not None:
            health.cancel()
        return 0
    if settings.gpu_claim_dir:
        from dataclasses import replace

        from rtpllm.cli.serve import claimed_cuda_device

        settings = replace(settings, device=claimed_cuda_device(settings.gpu_claim_dir))
    model_dir, encoder, pool = await asyncio.to_thread(_load, settings)
    nc = await connect_nats(settings.nats, f"rtpllm-{instance_id}", settings.nats_connect_timeout_s)
    tiers = None
    if settings.kvstore_host_id:
        from rtpllm.kvstore.client import RemoteKVStore

        tiers = await asyncio.to_thread(
            RemoteKVStore.connect, settings.kvstore_nats_url, settings.kvstore_host_id, pool.kv, pool.layout.namespace,
            kv_host=settings.kv_host, backends=[b for b in settings.kv_backends if b != "cuda_ipc"] or ["tcp"],
        )  # fmt: skip
        if tiers is None:
            log.warning("no kvstore answered for host %s: embeddings stay in memory only", settings.kvstore_host_id)
    config = VisionServerConfig(
        instance_id=instance_id,
        model=served_model_name(settings.model, settings.served_model_name),
        max_batch_images=settings.max_batch_images,
        batch_wait_s=settings.batch_wait_s,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        lease_s=settings.lease_s,
    )
    from rtpllm.transfer import KVSender

    sender = KVSender(pool.kv, pool.layout, prefer=settings.kv_backends)
    server = VisionServer(nc, encoder, pool, config, tiers=tiers, sender=sender)
    await server.start()
    log.info(
        "%s: %s serving %r on %s (%d embedding blocks, %.2f GiB; loaded in %.2f s)",
        READY_LINE, instance_id, config.model, settings.device, pool.num_blocks,
        pool.num_blocks * pool.block_bytes / (1 << 30), time.perf_counter() - t0,
    )  # fmt: skip
    health = None
    if settings.health_file:
        health = asyncio.create_task(keep_fresh(settings.health_file, lambda: nc.is_connected, settings.heartbeat_interval_s))
    await stop.wait()
    log.info("stopping")
    if health is not None:
        health.cancel()
    await server.close()
    with contextlib.suppress(Exception):
        await nc.drain()
    log.info("stopped")
    return 0


def run(settings: VisionSettings) -> int:
    return asyncio.run(serve(settings))
