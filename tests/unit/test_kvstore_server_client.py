"""The kvstore service and its engine-side client, in one process over a real nats-server
and real data-plane sockets: blocks stored by one engine pool come back bit for bit into
another; a get stops at the first missing key; staging space and leases are given back;
a kvstore that is gone, refuses or never completes is a miss, never an exception."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch

from rtpllm import LLM, SamplingParams
from rtpllm.config import OffloadConfig
from rtpllm.kvcache.block_hash import block_keys
from rtpllm.kvcache.events import AllBlocksCleared, BlocksStored
from rtpllm.kvstore import HostTier, SSDTier, TieredKVStore
from rtpllm.kvstore.client import RemoteKVStore
from rtpllm.kvstore.service import KVStoreServer, KVStoreServerConfig
from rtpllm.protocol import subjects
from rtpllm.protocol.convert import layout_from_spec, layout_spec
from rtpllm.protocol.messages import (
    DataPlaneEndpoint,
    KVEvents,
    KVLayoutSpec,
    KVSnapshot,
    KVSnapshotRequest,
    KVStoreGet,
    KVStoreGetReply,
    KVStoreHeartbeat,
    KVStorePut,
    KVStorePutReply,
    decode,
    encode,
)
from rtpllm.routing.prefix_index import PrefixIndex
from rtpllm.runtime.processes import ManagedProcess, start_nats
from rtpllm.serving.bus import connect_nats
from rtpllm.transfer import KVEndpoint, KVLayout, KVSender, TransferRefused

pytestmark = pytest.mark.timeout(60)

NS = b"kvstore-test-ns-"
HOST = "test-host"


def make_pool(num_blocks: int, seed: int) -> torch.Tensor:
    kv = torch.empty(2, 2, num_blocks + 1, 4, 2, 8, dtype=torch.float32)
    kv.view(torch.int32).random_(generator=torch.Generator().manual_seed(seed))
    return kv


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def keys(n: int, tag: int = 0) -> list[bytes]:
    return [bytes([tag, i]) + os.urandom(14) for i in range(n)]


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class ServerThread:
    """A KVStoreServer on its own event loop thread (the test thread plays the engine)."""

    def __init__(self, nats_url: str, store: TieredKVStore | None = None, **config: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.store = store if store is not None else TieredKVStore(HostTier(64 << 20))
        self.server: KVStoreServer = self.call(self._start(nats_url, KVStoreServerConfig(host_id=HOST, **config)))

    async def _start(self, url: str, config: KVStoreServerConfig) -> KVStoreServer:
        self.nc = await connect_nats(url, "kvstore-test", 5)
        server = KVStoreServer(self.nc, self.store, config)
        await server.start()
        return server

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return

        async def stop() -> None:
            await self.server.close()
            await self.nc.close()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.store.close()


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    proc: ManagedProcess
    proc, url = start_nats()
    yield url
    proc.stop(5)


@pytest.fixture
def server(nats_url: str) -> Iterator[ServerThread]:
    s = ServerThread(nats_url, staging_bytes=4 * 2 * 2 * 4 * 2 * 8 * 4, transfer_lease_s=1.0)  # 4 staging blocks
    yield s
    s.stop()


def client(nats_url: str, kv: torch.Tensor, **kw: Any) -> RemoteKVStore:
    c = RemoteKVStore.connect(nats_url, HOST, kv, NS, wait_s=5, request_timeout_s=1.0, transfer_timeout_s=2.0, **kw)
    assert c is not None
    return c


def test_blocks_round_trip_between_two_engine_pools(nats_url: str, server: ServerThread) -> None:
    a_kv, b_kv = make_pool(16, seed=1), make_pool(16, seed=2)
    before = b_kv.clone()
    a, b = client(nats_url, a_kv), client(nats_url, b_kv)
    try:
        k = keys(10)
        src = [3, 9, 0, 14, 7, 1, 12, 5, 2, 11]
        layout = KVLayout.of(a_kv, NS)

        def settled(n: int) -> Callable[[], bool]:
            return lambda: len(server.store.host) == n and server.server.staging_free() == {layout: 4}

        a.store_from(k[:6], src[:6])  # 6 blocks, 4 staging blocks: the last 2 are refused
        wait_for(settled(4))
        assert server.server.counters.refused_blocks == 2
        a.store_from(k[:8], src[:8])  # the first 4 are held already
        wait_for(settled(8))
        a.store_from(k[8:], src[8:])
        wait_for(settled(10))
        assert b.lookup(k + keys(2, tag=1)) == ["host"] * 10
        dst = [15, 4, 8, 6, 10, 13, 16, 1, 2, 0]  # 16: the scratch block is a block too
        assert b.fetch_into(k, dst) == 10  # 4 staging blocks: three gets, `more` each time
        assert torch.equal(bits(b_kv[:, :, dst]), bits(a_kv[:, :, src]))
        others = [i for i in range(17) if i not in dst]
        assert torch.equal(bits(b_kv[:, :, others]), bits(before[:, :, others]))
        wait_for(lambda: server.server.counters.blocks_sent == 10)  # the last Done may trail
        assert server.server.counters.gets == 3 and server.server.staging_free() == {layout: 4}
    finally:
        a.close()
        b.close()


def test_a_get_stops_at_the_first_missing_key(nats_url: str, server: ServerThread) -> None:
    a_kv, b_kv = make_pool(8, seed=3), make_pool(8, seed=4)
    before = b_kv.clone()
    a, b = client(nats_url, a_kv), client(nats_url, b_kv)
    try:
        k = keys(4)
        a.store_from(k[:2], [5, 6])
        a.store_from(k[3:], [7])  # key 2 is missing
        wait_for(lambda: len(server.store.host) == 3)
        assert b.lookup(k) == ["host", "host"]
        assert b.fetch_into(k, [1, 2, 3, 4]) == 2
        assert torch.equal(bits(b_kv[:, :, [1, 2]]), bits(a_kv[:, :, [5, 6]]))
        assert torch.equal(bits(b_kv[:, :, [3, 4]]), bits(before[:, :, [3, 4]]))
        assert b.fetch_into(keys(3, tag=2), [1, 2, 3]) == 0  # nothing there: no transfer opened
        a.store_from(k[:2], [5, 6])  # held already: the kvstore asks for nothing
        assert server.server.counters.blocks_stored == 3
    finally:
        a.close()
        b.close()


def test_a_full_outbox_drops_stores_instead_of_waiting(nats_url: str, server: ServerThread) -> None:
    kv = make_pool(8, seed=8)
    c = client(nats_url, kv, outbox_bytes=2 * 1024)  # two blocks of 1 KiB
    try:
        k = keys(3)
        c.store_from(k, [1, 2, 3])  # returns at once: the third block finds no outbox room
        assert c.counters["outbox_full"] == 1
        wait_for(lambda: len(server.store.host) == 2 and c._outbox.num_free == 2)
        assert c.lookup(k) == ["host", "host"]
        c.store_from(k[2:], [3])  # room again
        wait_for(lambda: len(server.store.host) == 3)
    finally:
        c.close()


def test_a_put_never_sent_is_dropped_after_its_lease(nats_url: str, server: ServerThread) -> None:
    kv = make_pool(4, seed=5)
    spec = layout_spec(KVLayout.of(kv, NS))

    async def put_and_vanish() -> KVStorePutReply:
        nc = await connect_nats(nats_url, "vanishing-engine", 5)
        try:
            subject = subjects.kvstore_subject(HOST, subjects.KVStoreOp.PUT)
            msg = await nc.request(subject, encode(KVStorePut(layout=spec, keys=keys(3))), timeout=2)
            return decode(msg.data, KVStorePutReply)
        finally:
            await nc.close()

    reply = asyncio.run(put_and_vanish())
    assert reply.positions == [0, 1, 2] and reply.endpoint is not None and reply.lease_s == 1.0
    layout = KVLayout.of(kv, NS)
    assert server.server.staging_free()[layout] == 1  # three held for the transfer
    wait_for(lambda: server.server.staging_free()[layout] == 4, timeout=3)  # lease (1 s) over: reused
    assert server.server.counters.failed_transfers == 1
    assert len(server.store.host) == 0


def test_a_put_opens_only_with_the_token_of_its_reply(nats_url: str, server: ServerThread) -> None:
    """The kvstore's data plane takes a put only from whoever holds the one-time token
    that came back over NATS with the endpoint, and only once."""
    kv = make_pool(4, seed=7)
    layout = KVLayout.of(kv, NS)
    put_keys = keys(2, tag=9)

    async def put() -> None:
        nc = await connect_nats(nats_url, "token-engine", 5)
        sender = KVSender(kv, layout, prefer=["tcp"])
        try:
            subject = subjects.kvstore_subject(HOST, subjects.KVStoreOp.PUT)
            msg = await nc.request(subject, encode(KVStorePut(layout=layout_spec(layout), keys=put_keys)), timeout=2)
            reply = decode(msg.data, KVStorePutReply)
            assert reply.endpoint is not None and len(reply.transfer_token) == 16
            endpoint = KVEndpoint(**msgspec.structs.asdict(reply.endpoint))
            for wrong in (b"", bytes(16)):
                with pytest.raises(TransferRefused, match="token"):
                    await sender.open(endpoint, reply.transfer_id, 2, timeout_s=2, token=wrong)
            out = await sender.open(endpoint, reply.transfer_id, 2, timeout_s=2, token=reply.transfer_token)
            await out.send([0, 1], 0)
            await out.finish()
            with pytest.raises(TransferRefused):  # a replay
                await sender.open(endpoint, reply.transfer_id, 2, timeout_s=2, token=reply.transfer_token)
        finally:
            await sender.close()
            await nc.close()

    asyncio.run(put())
    wait_for(lambda: len(server.store.host) == 2)
    assert server.server.counters.failed_transfers == 0


def test_the_kvstore_reports_its_host_tier_to_routers(nats_url: str, tmp_path: Path) -> None:
    """KV events of the host tier: puts store, evictions remove, a get's promotions from
    SSD store again; a router that joins late resyncs from a snapshot and then follows
    the events to exactly the host tier's keys."""
    # Room for about two encoded blocks: puts evict; evicted blocks go to SSD.
    store = TieredKVStore(HostTier(2600), SSDTier(tmp_path, 1 << 20), ssd_min_hits=0)
    server = ServerThread(nats_url, store=store, events_interval_s=0.01)
    events_id = server.server.events_id
    assert events_id == subjects.kvstore_events_id(HOST)
    got: list[KVEvents] = []

    async def listen() -> Any:
        nc = await connect_nats(nats_url, "kv-events-listener", 5)

        async def on_events(msg: Any) -> None:
            got.append(decode(msg.data, KVEvents))

        await nc.subscribe(subjects.kv_events_subject(events_id), cb=on_events)
        return nc

    async def snapshot(nc: Any) -> KVSnapshot:
        msg = await nc.request(subjects.kv_snapshot_subject(events_id), encode(KVSnapshotRequest(gateway_id="t")), timeout=2)
        return decode(msg.data, KVSnapshot)

    def promoted_reported() -> bool:
        # The put's own event cannot hold k[0]: host memory evicted it within the put.
        return any(isinstance(e, BlocksStored) and k[0] in e.block_keys for b in got for e in b.batch.events)

    kv = make_pool(8, seed=9)
    c = client(nats_url, kv)
    listener = server.call(listen())
    try:
        k = keys(4)
        index = PrefixIndex()
        snap = server.call(snapshot(listener))  # joins after the kvstore's first batch
        index.replace(events_id, snap.block_keys, snap.seq, host_keys=snap.host_block_keys)
        c.store_from(k, [1, 2, 3, 4])
        store.flush(5)
        wait_for(lambda: len(store.ssd) >= 2)  # evicted from host memory, demoted to SSD
        assert c.fetch_into(k[:1], [5]) == 1  # from SSD, promoted back into host memory
        wait_for(promoted_reported)
        kinds = [type(e).__name__ for b in got for e in b.batch.events]
        assert "BlocksStored" in kinds and "BlocksRemoved" in kinds, kinds
        assert all(e.tier == "host" for b in got for e in b.batch.events if not isinstance(e, AllBlocksCleared))
        for b in got:
            index.apply(events_id, b.batch)
        assert not index.needs_resync(events_id), "the snapshot's seq and the batches after it join up"
        host = set(store.host.keys())
        assert k[0] in host
        assert index.num_host_keys(events_id) == len(host)
        assert index.match("engine", k[:1], events_id).host == 1
    finally:
        c.close()
        server.call(listener.close())
        server.stop()


def test_bad_requests_get_an_error_reply(nats_url: str, server: ServerThread) -> None:
    bad = KVLayoutSpec(namespace=NS, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="Tensor")
    endpoint = DataPlaneEndpoint(host="127.0.0.1", port=1, host_id="h", device="cpu", backends=["tcp"])

    async def ask() -> tuple[KVStorePutReply, KVStoreGetReply]:
        nc = await connect_nats(nats_url, "bad-engine", 5)
        try:
            put = await nc.request(subjects.kvstore_subject(HOST, "put"), encode(KVStorePut(layout=bad, keys=keys(1))), timeout=2)
            get_msg = KVStoreGet(layout=bad, keys=keys(1), endpoint=endpoint, transfer_id="t", lease_s=1)
            get = await nc.request(subjects.kvstore_subject(HOST, "get"), encode(get_msg), timeout=2)
            return decode(put.data, KVStorePutReply), decode(get.data, KVStoreGetReply)
        finally:
            await nc.close()

    put, get = asyncio.run(ask())
    assert put.error is not None and "dtype" in put.error.message
    assert get.error is not None and get.count == 0


def test_no_kvstore_is_none_and_a_dead_one_is_a_miss(nats_url: str) -> None:
    kv = make_pool(8, seed=6)
    t0 = time.monotonic()
    assert RemoteKVStore.connect(nats_url, "nobody-here", kv, NS, wait_s=0.5) is None
    assert time.monotonic() - t0 < 3
    server = ServerThread(nats_url)
    c = client(nats_url, kv, down_backoff_s=0.5)
    try:
        k = keys(2)
        c.store_from(k, [1, 2])
        wait_for(lambda: len(server.store.host) == 2)
        server.stop()
        before = kv.clone()
        t0 = time.monotonic()
        assert c.lookup(k) == []  # no responders: a miss, at once
        assert c.fetch_into(k, [3, 4]) == 0  # within the back-off: not even asked
        c.store_from(k, [3, 4])
        assert time.monotonic() - t0 < 1.0
        assert torch.equal(bits(kv), bits(before))
        assert not c.available and c.counters["failures"] >= 1 and c.counters["skipped"] >= 2
        # A kvstore that comes back is used again (its heartbeat makes it available).
        server = ServerThread(nats_url)
        wait_for(lambda: c.available, timeout=3)
        c.store_from(k, [1, 2])
        wait_for(lambda: len(server.store.host) == 2)
        assert c.lookup(k) == ["host", "host"]
    finally:
        c.close()
        server.stop()


def test_a_hung_or_lying_kvstore_is_a_miss_within_the_timeouts(nats_url: str) -> None:
    """A fake kvstore that answers pings, never answers lookups, and promises blocks on a
    get that it never sends."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def fake() -> Any:
        nc = await connect_nats(nats_url, "fake-kvstore", 5)
        beat = KVStoreHeartbeat(host_id=HOST, kvstore_id="fake", seq=1, lease_s=30.0)

        async def on_ping(msg: Any) -> None:
            await msg.respond(encode(beat))

        async def on_get(msg: Any) -> None:
            await msg.respond(encode(KVStoreGetReply(count=2)))

        async def ignore(msg: Any) -> None:
            pass

        await nc.subscribe(subjects.kvstore_subject(HOST, "ping"), cb=on_ping)
        await nc.subscribe(subjects.kvstore_subject(HOST, "lookup"), cb=ignore)
        await nc.subscribe(subjects.kvstore_subject(HOST, "get"), cb=on_get)
        return nc

    nc = asyncio.run_coroutine_threadsafe(fake(), loop).result(10)
    kv = make_pool(8, seed=9)
    before = kv.clone()
    c = RemoteKVStore.connect(nats_url, HOST, kv, NS, wait_s=5, request_timeout_s=0.3, transfer_timeout_s=0.5, down_backoff_s=0.2)
    assert c is not None
    try:
        t0 = time.monotonic()
        assert c.lookup(keys(2)) == []
        assert 0.25 < time.monotonic() - t0 < 2
        time.sleep(0.3)  # the back-off
        t0 = time.monotonic()
        assert c.fetch_into(keys(2), [1, 2]) == 0  # promised, never sent: the lease ends it
        assert time.monotonic() - t0 < 3
        assert torch.equal(bits(kv), bits(before)) and c.counters["failures"] == 2
        assert not c._broken, "slow answers are failures, not a stuck client"
    finally:
        c.close()
        asyncio.run_coroutine_threadsafe(nc.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_messages_carry_the_layout(nats_url: str) -> None:
    kv = make_pool(2, seed=7)
    spec = layout_spec(KVLayout.of(kv, NS))
    assert msgspec.structs.asdict(spec) == {
        "namespace": NS, "num_layers": 2, "block_size": 4, "num_kv_heads": 2, "head_dim": 8, "dtype": "float32",
        "layer_formats": (),
    }  # fmt: skip
    # A mixed per-layer plan's layout names every layer's format, and comes back equal.
    mixed = KVLayout.of_layers(NS, ("float32", "int8"), 4, 2, 8)
    wire = decode(encode(KVStorePut(layout=layout_spec(mixed), keys=[])), KVStorePut).layout
    assert wire.layer_formats == ("float32", "int8") and layout_from_spec(wire) == mixed
    with pytest.raises(ValueError, match="unknown stored KV format"):
        layout_from_spec(msgspec.structs.replace(wire, layer_formats=("float32", "int4")))


# -- engines using the kvstore (KVOffload with a RemoteKVStore) ---------------------------

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = [(13 * i + 5) % 300 for i in range(64)] + [1, 2, 3]  # 8 full blocks of 8


def engine(ckpt: Path, nats_url: str, **offload: Any) -> LLM:
    config = OffloadConfig(kvstore_nats_url=nats_url, kvstore_wait_s=offload.pop("wait_s", 5.0), **offload)
    return LLM(str(ckpt), device="cpu", block_size=8, num_blocks=24, max_num_batched_tokens=128, offload=config)


def test_an_engine_restores_what_another_wrote_through(tiny_llama: Path, nats_url: str) -> None:
    reference = LLM(str(tiny_llama), device="cpu", block_size=8, num_blocks=24).generate([PROMPT], PARAMS)[0]
    server = ServerThread(nats_url)
    a = engine(tiny_llama, nats_url, kvstore_host_id=HOST)
    b = engine(tiny_llama, nats_url, kvstore_host_id=HOST)
    try:
        assert a.engine.offload is not None and a.engine.offload.store is None  # no tiers of its own
        assert a.engine.offload.write_through, "on by default with a kvstore"
        out_a = a.generate([PROMPT], PARAMS)[0]
        assert out_a.num_cached_tokens == 0
        wait_for(lambda: len(server.store.host) >= 8)
        out_b = b.generate([PROMPT], PARAMS)[0]
        assert out_b.num_cached_tokens == 64, "every full block came from the kvstore"
        assert out_b.outputs[0].token_ids == out_a.outputs[0].token_ids == reference.outputs[0].token_ids
        assert b.engine.offload is not None and b.engine.offload.stats.restored_blocks["host"] == 8
        assert b.engine.stats().tier_hit_tokens["host"] == 64
    finally:
        a.engine.close()
        b.engine.close()
        server.stop()


def test_engines_with_a_mixed_plan_share_blocks_through_the_kvstore(tiny_llama: Path, nats_url: str) -> None:
    """A mixed per-layer KV plan (layer 0 in the model's dtype, layer 1 int8) through the
    kvstore: the engine's layer pages go out through its outbox and come back into
    another engine's, staged in the kvstore's per-layout staging pool in between."""
    plan = {"kv_cache_dtype": "int8", "kv_cache_dtype_skip_layers": (0,)}
    reference = LLM(str(tiny_llama), device="cpu", block_size=8, num_blocks=24, **plan).generate([PROMPT], PARAMS)[0]  # type: ignore[arg-type]
    server = ServerThread(nats_url)

    def make() -> LLM:
        config = OffloadConfig(kvstore_nats_url=nats_url, kvstore_wait_s=5.0, kvstore_host_id=HOST)
        return LLM(str(tiny_llama), device="cpu", block_size=8, num_blocks=24, max_num_batched_tokens=128, offload=config, **plan)  # type: ignore[arg-type]

    a, b = make(), make()
    try:
        assert a.engine.kv_pool.kv is None and isinstance(a.engine.offload.tiers, RemoteKVStore)  # type: ignore[union-attr]
        assert a.generate([PROMPT], PARAMS)[0].outputs[0].token_ids == reference.outputs[0].token_ids
        wait_for(lambda: len(server.store.host) >= 8)
        (layout,) = server.server.staging_free()
        assert layout.layer_formats == ("float32", "int8")
        out_b = b.generate([PROMPT], PARAMS)[0]
        assert out_b.num_cached_tokens == 64, "every full block came from the kvstore"
        assert out_b.outputs[0].token_ids == reference.outputs[0].token_ids
        assert b.engine.offload is not None and b.engine.offload.stats.restored_blocks["host"] == 8
        # Bit for bit: b's restored blocks hold a's bytes, every layer's pages.
        assert torch.equal(whole_blocks(b, PROMPT[:64]), whole_blocks(a, PROMPT[:64]))
    finally:
        a.engine.close()
        b.engine.close()
        server.stop()


def whole_blocks(llm: LLM, tokens: list[int]) -> torch.Tensor:
    """The bytes of the blocks `llm`'s pool caches for `tokens` (whole blocks, in order)."""
    engine = llm.engine
    ids = engine.block_manager.cached_block_ids(block_keys(tokens, 8, engine.block_manager.namespace))
    assert len(ids) == len(tokens) // 8
    blocks = engine.kv_blocks()
    out = blocks.host_buffer(len(ids) * blocks.block_bytes)
    blocks.read_blocks(np.asarray(ids), out)
    return out


def test_without_a_kvstore_the_engine_falls_back_to_its_own_tiers(tiny_llama: Path, nats_url: str) -> None:
    own = engine(tiny_llama, nats_url, kvstore_host_id="nobody-here", host_bytes=1 << 20, wait_s=0.3)
    assert own.engine.offload is not None and own.engine.offload.store is not None
    assert not own.engine.offload.write_through, "in-process host memory only: nobody else reads it"
    own.engine.close()
    none = engine(tiny_llama, nats_url, kvstore_host_id="nobody-here", wait_s=0.3)
    assert none.engine.offload is None


def test_evicted_blocks_are_demoted_to_the_kvstore_and_come_back(tiny_llama: Path, nats_url: str) -> None:
    prompts = [[(13 * i + 5 + 31 * j) % 300 for i in range(64)] + [1, 2, 3] for j in range(4)]
    ref = LLM(str(tiny_llama), device="cpu", block_size=8, num_blocks=24)
    expected = [ref.generate([p], PARAMS)[0].outputs[0].token_ids for p in prompts]
    server = ServerThread(nats_url)
    llm = engine(tiny_llama, nats_url, kvstore_host_id=HOST, write_through=False)
    try:
        offload = llm.engine.offload
        assert offload is not None and isinstance(offload.tiers, RemoteKVStore)
        for j in [0, 1, 2, 3, 0, 2, 1, 3, 0]:  # 24 blocks hold about two: each evicts others
            assert offload.tiers.flush(), "stores are asynchronous: let them land first"
            out = llm.generate([prompts[j]], PARAMS)[0]
            assert out.outputs[0].token_ids == expected[j], j
        assert offload.stats.demoted_blocks > 0
        assert offload.stats.restored_blocks["host"] > 0 and offload.stats.offered_blocks == 0, (
            offload.stats, offload.tiers.stats(), server.server.counters, len(server.store.host)
        )
    finally:
        llm.engine.close()
        server.stop()
