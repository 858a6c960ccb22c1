"""Entry point of the kvstore service, one per host: build the host's tiers (host memory,
optional SSD and Redis), serve them over NATS and the data plane, stop on SIGTERM/SIGINT.
The logic is in rtpllm.kvstore.service; see docs/kvstore.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from rtpllm.kvstore import HostTier, SSDTier, TieredKVStore
from rtpllm.kvstore.service import KVStoreServer, KVStoreServerConfig
from rtpllm.serving.bus import connect_nats
from rtpllm.serving.health import keep_fresh
from rtpllm.serving.settings import KVStoreSettings

log = logging.getLogger("rtpllm.kvstore")

# `rtpllm up` and the tests wait for this line before they start engines.
READY_LINE = "kvstore ready"


def build_store(settings: KVStoreSettings) -> TieredKVStore:
    ssd = SSDTier(settings.ssd_dir, settings.ssd_bytes) if settings.ssd_dir and settings.ssd_bytes > 0 else None
    redis = None
    if settings.redis_url:
        from rtpllm.kvstore.redis_tier import RedisTier

        redis = RedisTier(settings.redis_url, ttl_s=settings.redis_ttl_s)
    return TieredKVStore(HostTier(settings.host_bytes), ssd, redis)


async def serve(settings: KVStoreSettings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = await asyncio.to_thread(build_store, settings)  # the SSD tier scans its directory
    nc = await connect_nats(settings.nats, f"rtpllm-kvstore-{settings.host_id}", settings.nats_connect_timeout_s)
    config = KVStoreServerConfig(
        host_id=settings.host_id,
        kv_host=settings.kv_host,
        kv_port=settings.kv_port,
        staging_bytes=settings.staging_bytes,
        transfer_lease_s=settings.transfer_lease_s,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        lease_s=settings.lease_s,
    )
    server = KVStoreServer(nc, store, config)
    await server.start()
    tiers = ", ".join(f"{name} {entry.get('capacity_bytes', 0) / (1 << 30):.2f} GiB" if name != "redis" else "redis" for name, entry in store.stats().items() if name in ("host", "ssd", "redis"))
    log.info("%s: host %s (%s)", READY_LINE, settings.host_id, tiers)
    health = None
    if settings.health_file:
        health = asyncio.create_task(
            keep_fresh(settings.health_file, lambda: nc.is_connected, settings.heartbeat_interval_s)
        )
    await stop.wait()
    log.info("stopping")
    if health is not None:
        health.cancel()
    await server.close()
    flushed = await asyncio.to_thread(store.close)
    if not flushed:
        log.warning("some write-behind blocks were not written before the deadline")
    with contextlib.suppress(Exception):
        await nc.drain()
    log.info("stopped")
    return 0


def run(settings: KVStoreSettings) -> int:
    return asyncio.run(serve(settings))
