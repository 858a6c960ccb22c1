"""KVStoreServer: one host's KV tiers (a TieredKVStore) served to the engines of that host.

Metadata over NATS (request/reply on `rtpllm.v1.kvstore.<host_id>.<op>`), KV bytes over
the data plane (ARCHITECTURE rule 2), between the engine's pool and a staging pool here:

- lookup: the tier of each key of the longest stored prefix.
- get: the engine has called `expect(transfer_id, block_ids, allow_fewer=True)` on its
  receiver and sent the transfer's one-time token with the get; the kvstore fetches the
  blocks (`get_many`), decodes the leading present ones into staging blocks, replies how
  many it sends, and ships them with its KVSender (opening with that token).
- put: the kvstore takes staging blocks for the keys it lacks, expects a transfer into
  them and replies with its endpoint and the transfer's one-time token; the engine ships
  the blocks; once they have landed they are encoded and `put_many`ed.
- ping and a heartbeat on `rtpllm.v1.registry.kvstore`: engines know whether it is there.
- KV events of the host tier for routers, as an instance would publish them, under the id
  `kvstore-<host_id>` (`rtpllm.v1.kv.kvstore-<host_id>.events`, and snapshots on
  `...snapshot`): blocks stored by puts and removed by evictions, `tier="host"`. Engines
  that use this kvstore say so in their heartbeats, and a router credits them with it.

Leases (rule 5): a put whose transfer does not complete within `transfer_lease_s` is
dropped; a get whose send does not finish within its lease is aborted; either way the
staging blocks are reused. See docs/kvstore.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from rtpllm.kvcache.events import AllBlocksCleared, KVEventBatch
from rtpllm.kvstore.block_codec import InvalidBlock, decode_into, encode_blocks
from rtpllm.kvstore.staging import StagingPool
from rtpllm.kvstore.store import HostTierEvents, TieredKVStore
from rtpllm.protocol import subjects
from rtpllm.protocol.convert import layout_from_spec
from rtpllm.protocol.messages import (
    DataPlaneEndpoint,
    ErrorCode,
    ErrorInfo,
    KVEvents,
    KVSnapshot,
    KVSnapshotRequest,
    KVStoreCounters,
    KVStoreGet,
    KVStoreGetReply,
    KVStoreHeartbeat,
    KVStoreLookup,
    KVStoreLookupReply,
    KVStorePing,
    KVStorePut,
    KVStorePutReply,
    ProtocolError,
    decode,
    encode,
)
from rtpllm.protocol.parts import events_parts, snapshot_parts
from rtpllm.protocol.subjects import KVStoreOp
from rtpllm.transfer import KVEndpoint, KVLayout, TransferError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVStoreServerConfig:
    """`host_id`: the subject token engines address this kvstore by. `kv_host`/`kv_port`:
    where the first staging pool's receiver listens (later layouts take a free port).
    `staging_bytes`: staging pool per layout. `transfer_lease_s`: how long a put or get
    transfer may take before it is dropped. `max_layouts`: distinct layouts served."""

    host_id: str
    kv_host: str = "127.0.0.1"
    kv_port: int = 0
    staging_bytes: int = 256 << 20
    transfer_lease_s: float = 10.0
    staging_wait_s: float = 0.5  # a get waits this long for staging space before it sends less
    heartbeat_interval_s: float = 1.0
    lease_s: float = 3.0
    max_layouts: int = 8
    events_interval_s: float = 0.05  # how often the host tier's KV events go out


class KVStoreServer:
    """Serves `store` on the NATS connection `nc` (see the module docstring)."""

    def __init__(self, nc: NATS, store: TieredKVStore, config: KVStoreServerConfig) -> None:
        subjects.check_id(config.host_id, "host id")
        self._nc = nc
        self.store = store
        self.config = config
        self.kvstore_id = uuid.uuid4().hex[:12]
        self.counters = KVStoreCounters()
        self._started_at = time.time()
        self._seq = 0
        self._staging: dict[KVLayout, StagingPool] = {}
        self._staging_lock = asyncio.Lock()
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._beat: asyncio.Task[None] | None = None
        self._tiers = [t.name for t in (store.host, store.ssd, store.redis) if t is not None]
        # KV events of the host tier for routers (docs/kvstore.md): a first batch that
        # clears what a router knew of an earlier life of this host's kvstore, then what
        # puts store and evictions remove, published every `events_interval_s`.
        self.events_id = subjects.kvstore_events_id(config.host_id)
        self._event_seq = -1
        self._host_events = HostTierEvents(initial=[AllBlocksCleared()])
        self._events_task: asyncio.Task[None] | None = None
        # One batch at a time, its parts together: the events loop and a snapshot
        # request both publish, and a router drops a batch another one interrupts.
        self._events_lock = asyncio.Lock()
        store.host_events = self._host_events

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        handlers = {KVStoreOp.LOOKUP: self._on_lookup, KVStoreOp.GET: self._on_get, KVStoreOp.PUT: self._on_put, KVStoreOp.PING: self._on_ping}
        for op, handler in handlers.items():
            self._subs.append(await self._nc.subscribe(subjects.kvstore_subject(self.config.host_id, op), cb=self._spawner(handler)))
        self._subs.append(await self._nc.subscribe(subjects.KVSTORE_HEARTBEAT, cb=self._on_other_heartbeat))
        self._subs.append(await self._nc.subscribe(subjects.kv_snapshot_subject(self.events_id), cb=self._spawner(self._on_kv_snapshot)))
        self._beat = asyncio.create_task(self._heartbeat_loop(), name="kvstore-heartbeat")
        self._events_task = asyncio.create_task(self._events_loop(), name="kvstore-kv-events")

    async def close(self) -> None:
        """Stop answering, end the transfers in flight, close the data-plane ends."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._beat is not None:
            self._beat.cancel()
        if self._events_task is not None:
            self._events_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pool in self._staging.values():
            await pool.close()
        self._staging.clear()

    def heartbeat(self) -> KVStoreHeartbeat:
        self._seq += 1
        host = self.store.host
        return KVStoreHeartbeat(
            host_id=self.config.host_id, kvstore_id=self.kvstore_id, seq=self._seq, lease_s=self.config.lease_s,
            started_at=self._started_at, tiers=list(self._tiers), host_blocks=len(host),
            host_used_bytes=host.used_bytes, host_capacity_bytes=host.capacity_bytes,
            counters=msgspec.structs.replace(self.counters),
        )  # fmt: skip

    def staging_free(self) -> dict[KVLayout, int]:
        """Free staging blocks per layout (for tests and stats)."""
        return {layout: pool.num_free for layout, pool in self._staging.items()}

    # -- handlers ---------------------------------------------------------------------

    def _spawner(self, handler: Any) -> Any:
        # nats-py awaits one callback at a time per subscription: run each request in
        # its own task so a slow get never holds up a lookup.
        async def run(msg: Msg) -> None:
            try:
                await handler(msg)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug in one request must not stop the others
                log.exception("kvstore: request on %s failed", msg.subject)

        async def spawn(msg: Msg) -> None:
            self._spawn(run(msg))

        return spawn

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_ping(self, msg: Msg) -> None:
        with contextlib.suppress(ProtocolError):
            decode(msg.data, KVStorePing)
            await self._respond(msg, self.heartbeat())

    async def _on_lookup(self, msg: Msg) -> None:
        try:
            req = decode(msg.data, KVStoreLookup)
        except ProtocolError as exc:
            await self._respond(msg, KVStoreLookupReply(error=_bad(exc)))
            return
        self.counters.lookups += 1
        # Host and SSD answer from dicts; only a Redis round trip is worth a thread.
        if self.store.redis is not None:
            tiers = await asyncio.to_thread(self.store.lookup, req.keys)
        else:
            tiers = self.store.lookup(req.keys)
        await self._respond(msg, KVStoreLookupReply(tiers=tiers))

    async def _on_get(self, msg: Msg) -> None:
        try:
            req = decode(msg.data, KVStoreGet)
            layout = layout_from_spec(req.layout)
            pool = await self._pool(layout)
        except (ProtocolError, ValueError, RuntimeError) as exc:
            await self._respond(msg, KVStoreGetReply(error=_bad(exc)))
            return
        self.counters.gets += 1
        # At most a staging pool's worth per get: the reply's `more` asks for the rest.
        asked = req.keys[: pool.num_blocks]
        payloads = await asyncio.to_thread(self.store.get_many, asked)
        found = 0
        while found < len(payloads) and payloads[found] is not None:
            found += 1
        # A restore is worth a short wait for staging space (a get ahead may be ending).
        ids = await pool.take_waiting(found, self.config.staging_wait_s) if found else []
        self.counters.refused_blocks += found - len(ids)
        out = None
        try:
            count = await self._decode(pool, ids, payloads[: len(ids)], layout)  # type: ignore[arg-type]
            more = 0 < count == len(ids) and (len(ids) < found or found == len(asked) < len(req.keys))
            await self._respond(msg, KVStoreGetReply(count=count, more=more))
            if count:
                assert pool.sender is not None
                endpoint = KVEndpoint(**msgspec.structs.asdict(req.endpoint))
                async with asyncio.timeout(req.lease_s):
                    out = await pool.sender.open(endpoint, req.transfer_id, count, timeout_s=req.lease_s, token=req.transfer_token)
                    await out.send(ids[:count], 0)
                    pool.give_back(ids)  # read: free for the next transfer while the acks come
                    ids = []
                    await out.finish()
                self.counters.blocks_sent += count
        except (TransferError, OSError, TimeoutError) as exc:
            self.counters.failed_transfers += 1
            log.warning("get %s: transfer to %s:%d failed: %s", req.transfer_id, req.endpoint.host, req.endpoint.port, exc)
        finally:
            if ids:
                if out is not None:  # abort() returns once nothing reads the staging blocks
                    with contextlib.suppress(TransferError, OSError, RuntimeError, asyncio.CancelledError):
                        await asyncio.shield(out.abort("kvstore get failed"))
                pool.give_back(ids)

    async def _decode(self, pool: StagingPool, ids: list[int], payloads: list[bytes], layout: KVLayout) -> int:
        """Decode the payloads into staging blocks `ids`; how many leading ones made it."""
        count = len(ids)
        while count:
            try:
                # Blocks from get_many were checked by their tier (or never left this process).
                await asyncio.to_thread(decode_into, pool.kv, ids[:count], payloads[:count], layout, verify_checksum=False)
                return count
            except InvalidBlock as exc:  # nothing was written: try the good prefix alone
                log.warning("stored KV block unusable for a get: %s", exc)
                count = exc.index or 0
        return 0

    async def _on_put(self, msg: Msg) -> None:
        try:
            req = decode(msg.data, KVStorePut)
            layout = layout_from_spec(req.layout)
            pool = await self._pool(layout)
        except (ProtocolError, ValueError, RuntimeError) as exc:
            await self._respond(msg, KVStorePutReply(error=_bad(exc)))
            return
        self.counters.puts += 1
        # Keys held here already (host memory or SSD) need no transfer: blocks are immutable.
        held = self.store.host.contains_many(req.keys)
        if self.store.ssd is not None:
            held = [h or s for h, s in zip(held, self.store.ssd.contains_many(req.keys), strict=True)]
        seen: set[bytes] = set()
        wanted = []
        for i, (key, h) in enumerate(zip(req.keys, held, strict=True)):
            if not h and key not in seen:
                seen.add(key)
                wanted.append(i)
        ids = pool.take(len(wanted))
        self.counters.refused_blocks += len(wanted) - len(ids)
        wanted = wanted[: len(ids)]
        if not ids:
            await self._respond(msg, KVStorePutReply())
            return
        assert pool.receiver is not None
        transfer_id = f"put-{self.kvstore_id}-{uuid.uuid4().hex[:12]}"
        lease_s = self.config.transfer_lease_s
        incoming = pool.receiver.expect(transfer_id, ids, lease_s)
        try:
            endpoint = DataPlaneEndpoint(**msgspec.structs.asdict(pool.receiver.endpoint))
            reply = KVStorePutReply(endpoint=endpoint, transfer_id=transfer_id, transfer_token=incoming.token, positions=wanted, lease_s=lease_s)
            await self._respond(msg, reply)
            await incoming.wait()
            keys = [req.keys[i] for i in wanted]
            await asyncio.to_thread(self._commit, pool, ids, keys, layout)
            self.counters.blocks_stored += len(ids)
        except TransferError as exc:  # the lease ran out, the engine aborted, a bad checksum
            self.counters.failed_transfers += 1
            log.warning("put %s dropped: %s", transfer_id, exc)
        finally:
            incoming.cancel()  # no-op once it ended; wait() below then returns at once
            with contextlib.suppress(TransferError):
                await incoming.wait()
            pool.give_back(ids)

    def _commit(self, pool: StagingPool, ids: list[int], keys: list[bytes], layout: KVLayout) -> None:
        self.store.put_many(keys, encode_blocks(pool.kv, ids, layout))

    # -- KV events of the host tier -----------------------------------------------------

    async def _publish_events(self) -> None:
        async with self._events_lock:
            await self._publish_events_locked()

    async def _publish_events_locked(self) -> None:
        events = self._host_events.take()
        if not events:
            return
        self._event_seq += 1
        batch = KVEventBatch(engine_id=self.events_id, seq=self._event_seq, events=events)
        try:
            # A burst of puts or evictions can pass max_payload: then it goes in parts.
            parts = events_parts(KVEvents(instance_id=self.events_id, model="", batch=batch), self._nc.max_payload)
        except ProtocolError as exc:  # routers see the gap and ask for a snapshot
            log.error("kvstore KV events batch %d not published: %s", self._event_seq, exc)
            return
        with contextlib.suppress(Exception):  # a router that misses a batch resyncs
            for data in parts:
                await self._nc.publish(subjects.kv_events_subject(self.events_id), data)

    async def _events_loop(self) -> None:
        while True:
            await self._publish_events()
            await asyncio.sleep(self.config.events_interval_s)

    async def _on_kv_snapshot(self, msg: Msg) -> None:
        """A router asks for the whole host tier (it missed events)."""
        try:
            decode(msg.data, KVSnapshotRequest)
        except ProtocolError:
            return
        await self._publish_events()  # what the keys below include is then published
        keys = self.store.host.keys()
        snapshot = KVSnapshot(instance_id=self.events_id, seq=self._event_seq, block_keys=[], host_block_keys=keys)
        try:
            # A large host tier passes max_payload (about 58,000 keys a MiB): in parts.
            parts = snapshot_parts(snapshot, self._nc.max_payload)
        except ProtocolError as exc:
            log.error("kvstore KV snapshot not sent: %s", exc)
            return
        if msg.reply:
            with contextlib.suppress(Exception):
                for data in parts:
                    await msg.respond(data)

    # -- helpers ----------------------------------------------------------------------

    async def _pool(self, layout: KVLayout) -> StagingPool:
        pool = self._staging.get(layout)
        if pool is not None:
            return pool
        async with self._staging_lock:
            pool = self._staging.get(layout)
            if pool is None:
                if len(self._staging) >= self.config.max_layouts:
                    raise RuntimeError(f"this kvstore serves {self.config.max_layouts} KV layouts already")
                pool = StagingPool(layout, StagingPool.blocks_for(layout, self.config.staging_bytes))
                port = self.config.kv_port if not self._staging else 0
                await pool.start(self.config.kv_host, port)
                self._staging[layout] = pool
                log.info(
                    "staging pool for %s: %d blocks, data plane on %s:%d",
                    layout.namespace.hex()[:16], pool.num_blocks, self.config.kv_host, pool.receiver.port if pool.receiver else 0,
                )  # fmt: skip
        return pool

    async def _respond(self, msg: Msg, reply: msgspec.Struct) -> None:
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(encode(reply))

    async def _heartbeat_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self._nc.publish(subjects.KVSTORE_HEARTBEAT, encode(self.heartbeat()))
            await asyncio.sleep(self.config.heartbeat_interval_s)

    async def _on_other_heartbeat(self, msg: Msg) -> None:
        with contextlib.suppress(ProtocolError):
            hb = decode(msg.data, KVStoreHeartbeat)
            if hb.host_id == self.config.host_id and hb.kvstore_id != self.kvstore_id:
                log.warning("another kvstore (%s) also serves host id %s: give each host one kvstore", hb.kvstore_id, hb.host_id)


def _bad(exc: Exception) -> ErrorInfo:
    return ErrorInfo(ErrorCode.INVALID_REQUEST, str(exc))
