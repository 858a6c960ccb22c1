"""The NATS server's max_payload, respected: over a real nats-server whose max_payload
is 4 KiB (about 220 block keys a message), KV snapshots and KV event batches go out in
parts and come back whole, a snapshot with a lost part is asked for again, kvstore
requests with long key lists are split, and a message that cannot be cut is an error
naming it, never a silent retry."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator

import nats
import pytest
import torch
from nats.aio.msg import Msg

from rtpllm.kvcache.events import BlocksStored, CachedKeys, KVEventBatch
from rtpllm.kvstore import HostTier, TieredKVStore
from rtpllm.kvstore.client import RemoteKVStore
from rtpllm.kvstore.service import KVStoreServer, KVStoreServerConfig
from rtpllm.protocol import subjects
from rtpllm.protocol.messages import (
    GenerateRequest,
    KVEvents,
    KVSnapshot,
    KVSnapshotRequest,
    SamplingSpec,
    decode,
    encode,
)
from rtpllm.protocol.parts import events_parts, snapshot_parts
from rtpllm.routing.policy import LeastLoaded
from rtpllm.runtime.processes import ManagedProcess, free_port, nats_server_binary, port_open, wait_until
from rtpllm.serving.dispatcher import Dispatcher, DispatcherConfig, SubmitRejected
from rtpllm.serving.engine_server import EngineServer, EngineServerConfig
from rtpllm.serving.kv_events import KVEventPublisher
from rtpllm.serving.synthetic_engine import SyntheticEngine

pytestmark = pytest.mark.timeout(60)

MAX_PAYLOAD = 4096
NS = b"limits-test-ns-0"


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A nats-server refusing messages over MAX_PAYLOAD bytes (it has no flag for it:
    a config file)."""
    conf = tmp_path_factory.mktemp("nats") / "nats.conf"
    conf.write_text(f"max_payload: {MAX_PAYLOAD}\n")
    port = free_port()
    proc = ManagedProcess(
        "nats", [nats_server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port)]
    ).start()
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 10, "nats-server", [proc])
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.stop(5)


def keys(n: int, tag: int) -> list[bytes]:
    return [bytes([tag]) + i.to_bytes(3, "little") + os.urandom(12) for i in range(n)]


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


class CachedEngine(SyntheticEngine):
    """The zero-compute engine with a prefix cache to report (a router's resync)."""

    def __init__(self, cached: CachedKeys) -> None:
        super().__init__()
        self.cached = cached

    async def cached_block_keys(self) -> CachedKeys:
        return self.cached


class Bus:
    """An engine server (with a KV event publisher) and a gateway-side dispatcher."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conns: list[nats.NATS] = []
        self.servers: list[EngineServer] = []
        self.dispatcher: Dispatcher | None = None

    async def connect(self) -> nats.NATS:
        nc = await nats.connect(self.url)
        self.conns.append(nc)
        return nc

    async def server(
        self, engine: SyntheticEngine, instance_id: str
    ) -> tuple[EngineServer, KVEventPublisher]:
        nc = await self.connect()
        assert nc.max_payload == MAX_PAYLOAD  # what the server announced
        publisher = KVEventPublisher(nc, asyncio.get_running_loop(), instance_id, engine.info.model)
        config = EngineServerConfig(instance_id=instance_id, heartbeat_interval_s=0.1, lease_s=2.0)
        server = EngineServer(nc, engine, engine.info, config, kv_events=publisher)
        await server.start()
        self.servers.append(server)
        return server, publisher

    async def gateway(self) -> Dispatcher:
        config = DispatcherConfig(
            gateway_id="gw", submit_timeout_s=1.0, heartbeat_interval_s=0.1, lease_s=2.0,
            resync_interval_s=0.2, snapshot_timeout_s=0.5,
        )  # fmt: skip
        self.dispatcher = Dispatcher(await self.connect(), LeastLoaded(), config)
        await self.dispatcher.start()
        return self.dispatcher

    async def close(self) -> None:
        for server in self.servers:
            await server.drain(0)
        if self.dispatcher is not None:
            await self.dispatcher.close()
        for nc in self.conns:
            await nc.close()


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = Bus(nats_url)
    yield b
    await b.close()


async def test_snapshots_and_event_batches_travel_in_parts(bus: Bus) -> None:
    gpu, host = keys(1500, 1), keys(700, 2)
    engine = CachedEngine(CachedKeys(gpu, host, seq=7))
    snapshot = KVSnapshot(instance_id="w0", seq=7, block_keys=gpu, host_block_keys=host)
    assert len(snapshot_parts(snapshot, MAX_PAYLOAD)) >= 10  # 40 KB of keys: one message cannot hold it
    dispatcher = await bus.gateway()
    _, publisher = await bus.server(engine, "w0")
    await eventually(lambda: dispatcher.registry.get("w0") is not None)

    # One engine step storing 600 blocks: its batch goes out in parts and is applied whole.
    stored = keys(600, 3)
    batch = KVEventBatch("w0", 0, [BlocksStored(stored, None, 600 * 16)])
    assert len(events_parts(KVEvents(instance_id="w0", model="synthetic", batch=batch), MAX_PAYLOAD)) >= 3
    publisher(batch)
    await eventually(lambda: dispatcher.index.num_keys("w0") == 600)
    assert not dispatcher.index.needs_resync("w0")

    # A lost batch (seq 1 never sent): the gateway resyncs from a snapshot in parts.
    publisher(KVEventBatch("w0", 2, [BlocksStored(keys(1, 4), None, 16)]))
    await eventually(
        lambda: dispatcher.index.num_keys("w0") == 1500 and dispatcher.index.num_host_keys("w0") == 700
    )
    assert not dispatcher.index.needs_resync("w0")
    assert dispatcher.index.last_seq("w0") == 7
    assert dispatcher.index.match("w0", gpu[:3]).gpu == 3


async def test_a_snapshot_missing_a_part_is_asked_for_again(bus: Bus) -> None:
    """The first answer loses a part: the gateway keeps its view marked stale and asks
    again at a later heartbeat; the second answer is whole."""
    gpu = keys(1200, 5)
    engine = SyntheticEngine()  # no cache reader: the test answers snapshot requests itself
    dispatcher = await bus.gateway()
    _, publisher = await bus.server(engine, "w1")
    asked = 0
    responder = await bus.connect()

    async def answer(msg: Msg) -> None:
        nonlocal asked
        asked += 1
        parts = snapshot_parts(KVSnapshot(instance_id="w1", seq=3, block_keys=gpu), responder.max_payload)
        if asked == 1:
            del parts[len(parts) // 2]  # lost on the way
        for data in parts:
            await msg.respond(data)

    await responder.subscribe(subjects.kv_snapshot_subject("w1"), cb=answer)
    await eventually(lambda: dispatcher.registry.get("w1") is not None)
    # The gateway's first batch of w1 is seq 3: it missed some, so it asks for a snapshot.
    publisher(KVEventBatch("w1", 3, []))
    await eventually(lambda: asked >= 2 and not dispatcher.index.needs_resync("w1"))
    assert dispatcher.index.num_keys("w1") == 1200


async def test_a_message_too_large_to_cut_is_an_error_naming_it(bus: Bus) -> None:
    dispatcher = await bus.gateway()
    await bus.server(SyntheticEngine(), "w2")
    await eventually(lambda: dispatcher.registry.get("w2") is not None)
    huge = GenerateRequest(
        request_id="big", model="synthetic", prompt_token_ids=list(range(60_000, 62_000)), sampling=SamplingSpec(),
        reply_to="", gateway_id="", deadline=time.time() + 30,
    )  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(
        SubmitRejected,
        match=rf"GenerateRequest message of \d+ bytes exceeds the NATS server's max_payload of {MAX_PAYLOAD} bytes",
    ) as info:
        await dispatcher.submit(huge)
    assert info.value.error.code == "invalid_request"
    assert time.monotonic() - t0 < 0.5  # refused before anything was sent, not after retries
    assert dispatcher.num_streams == 0


async def test_kvstore_requests_and_host_tier_events_fit_the_limit(nats_url: str, bus: Bus) -> None:
    """600 blocks stored, looked up and fetched: each request's key list passes 4 KiB,
    and so does the kvstore's batch of host-tier events and its snapshot."""
    kv = torch.empty(2, 2, 601, 4, 2, 8, dtype=torch.float32)
    kv.view(torch.int32).random_(generator=torch.Generator().manual_seed(1))
    store = TieredKVStore(HostTier(64 << 20))
    nc = await bus.connect()
    server = KVStoreServer(
        nc, store, KVStoreServerConfig(host_id="limits-host", staging_bytes=2 << 20, events_interval_s=0.05)
    )
    await server.start()
    client = await asyncio.to_thread(
        RemoteKVStore.connect,
        nats_url,
        "limits-host",
        kv,
        NS,
        wait_s=5,
        request_timeout_s=2.0,
        transfer_timeout_s=5.0,
    )
    assert client is not None
    try:
        dispatcher = await bus.gateway()
        k = keys(600, 6)
        await asyncio.to_thread(client.store_from, k, list(range(1, 601)))
        assert await asyncio.to_thread(client.flush, 20)
        assert client.counters["stored_blocks"] == 600 and client.counters["dropped_stores"] == 0
        await eventually(lambda: len(store.host) == 600)  # committed once landed
        assert await asyncio.to_thread(client.lookup, k) == ["host"] * 600
        before = kv.clone()
        kv[:, :, 1:].zero_()
        assert await asyncio.to_thread(client.fetch_into, k, list(range(1, 601))) == 600
        assert torch.equal(kv.view(torch.int32), before.view(torch.int32))
        # 600 keys are 10.8 KB: each kind of request went in several messages.
        assert server.counters.puts >= 3 and server.counters.lookups >= 3 and server.counters.gets >= 3, (
            server.counters
        )
        # The gateway joined after the kvstore's first batches: it resyncs (in parts), then
        # follows the events (in parts) to exactly the host tier.
        events_id = server.events_id
        more = keys(300, 7)
        await asyncio.to_thread(client.store_from, more, list(range(1, 301)))
        assert await asyncio.to_thread(client.flush, 20)
        await eventually(lambda: dispatcher.index.num_host_keys(events_id) == 900, timeout=15)
        assert not dispatcher.index.needs_resync(events_id)
    finally:
        await asyncio.to_thread(client.close)
        await server.close()
        store.close()


async def test_an_old_style_single_request_still_gets_a_usable_first_part(nats_url: str, bus: Bus) -> None:
    """Compatibility within v1: a reader that knows nothing of parts asks with a plain
    request and decodes the first reply as a snapshot (a partial one)."""
    engine = CachedEngine(CachedKeys(keys(1000, 8), [], seq=1))
    await bus.server(engine, "w3")
    nc = await bus.connect()
    msg = await nc.request(
        subjects.kv_snapshot_subject("w3"), encode(KVSnapshotRequest(gateway_id="old")), timeout=2
    )
    first = decode(msg.data, KVSnapshot)
    assert first.part == 0 and first.parts > 1 and 0 < len(first.block_keys) < 1000
