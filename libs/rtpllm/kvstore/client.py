"""RemoteKVStore: an engine's side of its host's kvstore service (service.py).

The engine calls synchronous methods (from its own thread and its tier threads); the
work runs on an asyncio loop in a background thread, with its own NATS connection and two data-plane ends: a
KVReceiver on the engine's pool (blocks fetched from the kvstore land in it) and a
KVSender on an outbox, a small CPU staging pool of the engine's layout. A
tensor-parallel engine's pool is its `KVBlocks` view (whole blocks, every rank's KV
heads through rank 0): the receiver writes through it and the outbox copy reads through
it, so the kvstore sees the whole blocks a TP=1 engine would send. A mixed per-layer
pool is its layer pages' view (`LayerPoolBlocks`), and so is its outbox.

- `lookup` and `fetch_into` wait for the answer; the engine calls them from its
  background threads (rtpllm.engine.tier_prefetch), never from its step loop, and
  several may run at once (each get has its own transfer id).
- `store_from` copies the blocks into the outbox and returns: the put (a NATS request,
  then the transfer from the outbox) runs in the background, so the engine never waits
  for the kvstore to store. A full outbox drops the store (counted), never blocks.

Every failure -- the kvstore gone or hung, a timeout, a refused or corrupt transfer --
is a miss or a dropped store with a log line, never an exception into the engine
(ARCHITECTURE rule 6). After a failure the kvstore is skipped for `down_backoff_s`, and
while its heartbeats are missing, so a dead kvstore costs the engine no waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import msgspec
import nats.errors
import numpy as np
import torch
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from rtpllm.kvstore.engine_store import EngineKVStore
from rtpllm.kvstore.staging import StagingPool
from rtpllm.protocol import subjects
from rtpllm.protocol.convert import layout_spec
from rtpllm.protocol.messages import (
    DataPlaneEndpoint,
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
from rtpllm.protocol.parts import budget_for, key_runs
from rtpllm.protocol.subjects import KVStoreOp
from rtpllm.transfer import KVEndpoint, KVLayout, KVReceiver, KVSender, OutgoingTransfer, TransferError
from rtpllm.transfer.blocks import KVBlocks

log = logging.getLogger(__name__)

T = TypeVar("T")
TIERS = ("host", "ssd", "redis")
# Failures the engine must never see: the bus, the data plane, a bad reply.
_FAILURES = (nats.errors.Error, TransferError, ProtocolError, OSError, TimeoutError, ValueError)


class RemoteKVStore(EngineKVStore):
    """The kvstore of host `host_id`, for the engine pool `kv` with block-key `namespace`
    (`kv`: the pool tensor, or a tensor-parallel pool's `KVBlocks` view, whose layout
    must carry that namespace).

    Use `connect()`, which returns None when no kvstore answers. `request_timeout_s`
    bounds each NATS request; `transfer_timeout_s` each data-plane wait. `nats_url` is
    the whole NATS connection in one string: credentials in its userinfo, TLS files in
    its query (`rtpllm.serving.bus.NatsConfig.as_url`), as the engine's service has it.
    """

    on_network = True  # every lookup and fetch is a NATS round trip (and a transfer)

    def __init__(
        self,
        nats_url: str,
        host_id: str,
        kv: torch.Tensor | KVBlocks,
        namespace: bytes,
        *,
        request_timeout_s: float = 2.0,
        transfer_timeout_s: float = 5.0,
        outbox_bytes: int = 256 << 20,
        down_backoff_s: float = 2.0,
        kv_host: str = "127.0.0.1",
        backends: Sequence[str] = ("shm", "tcp"),
    ) -> None:
        self.host_id = subjects.check_id(host_id, "kvstore host id")
        self.nats_url = nats_url
        self.kv = kv
        if isinstance(kv, KVBlocks):
            if kv.layout.namespace != namespace:
                raise ValueError("the pool's KVBlocks layout has another namespace than the one given")
            self.layout = kv.layout
        else:
            self.layout = KVLayout.of(kv, namespace)
        self._spec = layout_spec(self.layout)
        self.request_timeout_s = request_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.down_backoff_s = down_backoff_s
        self._kv_host = kv_host
        self._backends = list(backends)
        self._ids = itertools.count()
        self._client_id = uuid.uuid4().hex[:8]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rtpllm-kvstore-client", daemon=True)
        self._nc: NATS | None = None
        self._receiver: KVReceiver | None = None
        # The outbox: stores are copied here on the engine thread (take) and shipped from
        # here on the loop (give_back once read).
        self._outbox = StagingPool(self.layout, StagingPool.blocks_for(self.layout, outbox_bytes))
        self._sender: KVSender | None = None
        # Puts go one at a time, in order, over one data-plane connection (and one shm
        # ring): the outbox bounds what waits here.
        self._put_queue: asyncio.Queue[tuple[list[bytes], list[int]]] | None = None
        self._put_worker: asyncio.Task[None] | None = None
        self._last_beat = 0.0
        self._beat_lease_s = 3.0
        self._down_until = 0.0
        self._down_logged = False
        self._broken = False
        self._closed = False
        self.counters = dict.fromkeys(
            ("lookups", "fetched_blocks", "stored_blocks", "failures", "skipped", "dropped_stores", "outbox_full"), 0
        )

    # -- lifecycle --------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        nats_url: str,
        host_id: str,
        kv: torch.Tensor | KVBlocks,
        namespace: bytes,
        *,
        wait_s: float = 5.0,
        **kwargs: Any,
    ) -> RemoteKVStore | None:
        """A client whose kvstore answered a ping within `wait_s`, or None (nothing left running)."""
        client = cls(nats_url, host_id, kv, namespace, **kwargs)
        try:
            client._thread.start()
            if client._call(client._start(wait_s), wait_s + 10.0):
                return client
        except Exception as exc:  # noqa: BLE001 - no kvstore is a normal outcome
            log.warning("kvstore of host %s: cannot connect: %r", host_id, exc)
        client.close()
        return None

    async def _start(self, wait_s: float) -> bool:
        from rtpllm.serving.bus import connect_nats

        deadline = time.monotonic() + wait_s
        self._nc = await connect_nats(self.nats_url, f"rtpllm-kvstore-client-{self._client_id}", wait_s)
        await self._nc.subscribe(subjects.KVSTORE_HEARTBEAT, cb=self._on_heartbeat)
        backends = [b for b in self._backends if b != "cuda_ipc"]  # the kvstore's pools are in host memory
        # Fetched blocks land in the pool: a tensor-parallel pool's through its view.
        self._receiver = KVReceiver(self.kv, self.layout, host=self._kv_host, port=0, backends=backends)
        await self._receiver.start()
        self._sender = KVSender(self._outbox.kv, self.layout, prefer=backends, max_idle_links=1)
        self._put_queue = asyncio.Queue()
        self._put_worker = asyncio.get_running_loop().create_task(self._put_loop(), name="kvstore-puts")
        while True:  # the kvstore may still be starting
            try:
                msg = await self._nc.request(
                    subjects.kvstore_subject(self.host_id, KVStoreOp.PING), encode(KVStorePing()), timeout=min(1.0, wait_s)
                )
                self._beat(decode(msg.data, KVStoreHeartbeat))
                return True
            except (nats.errors.Error, ProtocolError, TimeoutError):
                if time.monotonic() + 0.2 >= deadline:
                    return False
                await asyncio.sleep(0.2)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._aclose(), 10.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _aclose(self) -> None:
        if self._put_worker is not None:  # let the stores queued end (each is bounded)
            with contextlib.suppress(TimeoutError):
                await self._drain(2 * (self.request_timeout_s + self.transfer_timeout_s))
            self._put_worker.cancel()
            await asyncio.gather(self._put_worker, return_exceptions=True)
        if self._sender is not None:
            await self._sender.close()
        if self._receiver is not None:
            await self._receiver.close()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    def stats(self) -> dict[str, Any]:
        return {"kvstore": self.host_id, "available": self.available, **self.counters}

    @property
    def available(self) -> bool:
        """Heartbeats arrive and no request failed in the last `down_backoff_s`."""
        now = time.monotonic()
        return (
            not (self._broken or self._closed)
            and now >= self._down_until
            and now - self._last_beat <= self._beat_lease_s
        )

    # -- the engine's calls -----------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> list[str]:
        if not keys:
            return []
        self.counters["lookups"] += 1
        return self._run("lookup", self._lookup(list(keys)), [], self._budget(self.request_timeout_s))

    def fetch_into(self, keys: Sequence[bytes], block_ids: Sequence[int]) -> int:
        if len(keys) != len(block_ids):
            raise ValueError(f"{len(keys)} keys for {len(block_ids)} blocks")
        if not keys:
            return 0
        n = self._run("fetch", self._fetch(list(keys), [int(b) for b in block_ids]), 0, self._budget(self.request_timeout_s + self.transfer_timeout_s))
        self.counters["fetched_blocks"] += n
        return n

    def store_from(self, keys: Sequence[bytes], block_ids: Sequence[int], *, only_new: bool = False) -> None:
        # `only_new` needs nothing here: the kvstore never asks for blocks it holds.
        if len(keys) != len(block_ids):
            raise ValueError(f"{len(keys)} keys for {len(block_ids)} blocks")
        if not keys:
            return
        if not self.available:
            self._skipped()
            return
        slots = self._outbox.take(len(keys))
        if len(slots) < len(keys):
            self.counters["outbox_full"] += len(keys) - len(slots)
            self.counters["dropped_stores"] += len(keys) - len(slots)
        if not slots:
            return
        n = len(slots)
        try:
            # The copy is what "read before the next step overwrites them" means here (on
            # CUDA it waits for the engine's queued work, like encode_blocks does).
            self._copy_out(list(block_ids[:n]), slots)
        except Exception:  # noqa: BLE001 - never into the engine
            log.exception("kvstore store: copying blocks to the outbox failed")
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._outbox.give_back, slots)
            self.counters["dropped_stores"] += n
            return
        try:
            self._loop.call_soon_threadsafe(self._enqueue_put, list(keys[:n]), slots)
        except RuntimeError:  # closed meanwhile
            self.counters["dropped_stores"] += n

    def _copy_out(self, block_ids: list[int], slots: list[int]) -> None:
        """Pool blocks -> outbox blocks. A copy_ per block: on CPU twice as fast as
        index_select + index_copy_ (one pass, no temporary); CUDA pools gather on the
        device first, then one device->host copy (which waits for the engine's work).
        A pool's view (tensor parallelism, a mixed per-layer plan) reads whole blocks
        first (through rank 0; every layer's pages)."""
        out = self._outbox.kv
        if isinstance(self.kv, KVBlocks):
            blocks = self.kv
            host = blocks.host_buffer(blocks.block_bytes * len(block_ids))
            blocks.follow_engine()  # CUDA: after the engine's writes enqueued so far
            blocks.read_blocks(np.asarray(block_ids, dtype=np.int64), host)
            if isinstance(out, KVBlocks):  # a mixed layout's outbox: its layer pages
                out.write_blocks(np.asarray(slots, dtype=np.int64), host, None)
                return
            lay = self.layout
            whole = host.view(lay.torch_dtype).view(len(block_ids), lay.num_layers, 2, lay.block_size, lay.num_kv_heads, lay.head_dim)
            for i, slot in enumerate(slots):
                out[:, :, slot].copy_(whole[i])
            return
        src = self.kv
        if self.kv.is_cuda:
            src = self.kv.index_select(2, torch.as_tensor(block_ids, device=self.kv.device)).cpu()
            block_ids = list(range(len(block_ids)))
        for slot, block in zip(slots, block_ids, strict=True):
            out[:, :, slot].copy_(src[:, :, block])

    @staticmethod
    def _budget(deadline_s: float) -> float:
        """How long the engine thread waits for a call whose coroutine ends by itself
        within `deadline_s`: that, plus the wait for a failed transfer to stop touching
        the pool (bounded by the data plane: 10 s for cuda_ipc, less for the others).
        Running past it means the client's loop is stuck."""
        return deadline_s + 12.0

    def _skipped(self) -> None:
        self.counters["skipped"] += 1
        if not self._down_logged:
            self._down_logged = True
            log.warning("kvstore of host %s unavailable: KV tier reads are misses, writes dropped", self.host_id)

    def _run(self, what: str, coro: Coroutine[Any, Any, T], miss: T, timeout: float) -> T:
        if not self.available:
            coro.close()
            self._skipped()
            return miss
        try:
            result = self._call(coro, timeout)
        except _FAILURES as exc:
            self._failed(what, exc)
            return miss
        except Exception as exc:  # noqa: BLE001 - a bug here must not take the engine down
            log.exception("kvstore %s failed unexpectedly", what)
            self._failed(what, exc)
            return miss
        if self._down_logged:
            self._down_logged = False
            log.info("kvstore of host %s is back", self.host_id)
        return result

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done():
                raise  # the coroutine's own timeout (a slow kvstore): an ordinary failure
            # Only if the loop is stuck: the coroutine's own timeouts fire long before.
            # Whatever it still does to the pool can no longer be ruled out: stop using it.
            future.cancel()
            self._broken = True
            log.error("kvstore client: no answer from its own event loop in %.0f s; kvstore disabled", timeout)
            raise

    def _failed(self, what: str, exc: BaseException) -> None:
        self.counters["failures"] += 1
        self._down_until = time.monotonic() + self.down_backoff_s
        log.warning("kvstore %s on host %s failed (%s); treating it as down for %.1f s", what, self.host_id, exc, self.down_backoff_s)

    # -- on the client loop -----------------------------------------------------------

    async def _request(self, op: KVStoreOp, message: msgspec.Struct, reply_type: type[T]) -> T:
        assert self._nc is not None
        msg = await self._nc.request(subjects.kvstore_subject(self.host_id, op), encode(message), timeout=self.request_timeout_s)
        reply = decode(msg.data, reply_type)
        error = getattr(reply, "error", None)
        if error is not None:
            raise ProtocolError(f"kvstore refused the {op.value}: {error.message}")
        return reply

    def _key_budget(self, empty: msgspec.Struct) -> int:
        """Bytes of keys one request like `empty` (its key list empty) may carry: a long
        prompt's keys can pass the server's max_payload, and then go in several requests."""
        assert self._nc is not None
        return budget_for(empty, self._nc.max_payload)

    async def _lookup(self, keys: list[bytes]) -> list[str]:
        tiers: list[str] = []
        for start, end in key_runs(keys, self._key_budget(KVStoreLookup(layout=self._spec, keys=[]))):
            reply = await self._request(KVStoreOp.LOOKUP, KVStoreLookup(layout=self._spec, keys=keys[start:end]), KVStoreLookupReply)
            found = reply.tiers[: end - start]
            if any(t not in TIERS for t in found):
                raise ProtocolError(f"unknown tier in {found}")
            tiers += found
            if len(found) < end - start:  # the stored prefix ends in this run
                break
        return tiers

    async def _fetch(self, keys: list[bytes], block_ids: list[int]) -> int:
        # One deadline for the whole restore, however many gets it takes.
        async with asyncio.timeout(self.request_timeout_s + self.transfer_timeout_s):
            return await self._fetch_chunks(keys, block_ids)

    async def _fetch_chunks(self, keys: list[bytes], block_ids: list[int]) -> int:
        assert self._receiver is not None
        endpoint = DataPlaneEndpoint(**msgspec.structs.asdict(self._receiver.endpoint))
        empty = KVStoreGet(
            layout=self._spec, keys=[], endpoint=endpoint, transfer_id=f"get-{self._client_id}-{2**63}",
            lease_s=self.transfer_timeout_s, transfer_token=bytes(16),
        )  # fmt: skip
        budget = self._key_budget(empty)
        done = 0
        while done < len(keys):
            # At most what one message holds: the rest in the next get.
            asked = key_runs(keys[done:], budget)[0][1]
            upto = done + asked
            transfer_id = f"get-{self._client_id}-{next(self._ids)}"
            incoming = self._receiver.expect(transfer_id, block_ids[done:upto], self.transfer_timeout_s, allow_fewer=True)
            try:
                get = KVStoreGet(
                    layout=self._spec, keys=keys[done:upto], endpoint=endpoint, transfer_id=transfer_id,
                    lease_s=self.transfer_timeout_s, transfer_token=incoming.token,
                )  # fmt: skip
                reply = await self._request(KVStoreOp.GET, get, KVStoreGetReply)
                if reply.count <= 0:
                    break
                await asyncio.wait_for(incoming.wait(), self.transfer_timeout_s)
                if incoming.num_blocks != reply.count:
                    raise ProtocolError(f"kvstore promised {reply.count} blocks and sent {incoming.num_blocks}")
            finally:
                # Returns once nothing writes the transfer's blocks any more (at once if
                # it completed): only then may the engine reuse them.
                incoming.cancel()
                with contextlib.suppress(TransferError):
                    await incoming.wait()
            done += reply.count
            if reply.count < asked and not reply.more:
                break  # it stopped at a key it does not have
        return done

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the stores handed over so far have ended (stored or dropped);
        False on timeout. For tests and shutdown: the engine never needs to."""
        if self._closed or self._put_queue is None:
            return True
        try:
            self._call(self._drain(timeout_s), timeout_s + 5.0)
            return True
        except TimeoutError:
            return False

    async def _drain(self, timeout_s: float) -> None:
        assert self._put_queue is not None
        await asyncio.wait_for(self._put_queue.join(), timeout_s)

    def _enqueue_put(self, keys: list[bytes], slots: list[int]) -> None:
        assert self._put_queue is not None
        self._put_queue.put_nowait((keys, slots))

    async def _put_loop(self) -> None:
        assert self._put_queue is not None
        while True:
            keys, slots = await self._put_queue.get()
            try:
                # A full outbox's keys can pass the server's max_payload: several puts.
                for start, end in key_runs(keys, self._key_budget(KVStorePut(layout=self._spec, keys=[]))):
                    await self._put(keys[start:end], slots[start:end])
            finally:
                self._put_queue.task_done()

    async def _put(self, keys: list[bytes], slots: list[int]) -> None:
        """Ship outbox blocks `slots` (holding the blocks of `keys`) to the kvstore."""
        assert self._sender is not None
        out: OutgoingTransfer | None = None
        try:
            reply = await self._request(KVStoreOp.PUT, KVStorePut(layout=self._spec, keys=keys), KVStorePutReply)
            positions = reply.positions
            if reply.endpoint is None or not positions:
                return  # it holds them all already (or has no room)
            if len(set(positions)) != len(positions) or not all(0 <= p < len(keys) for p in positions):
                raise ProtocolError(f"bad positions in the kvstore's put reply: {positions[:16]}")
            endpoint = KVEndpoint(**msgspec.structs.asdict(reply.endpoint))
            timeout = min(self.transfer_timeout_s, reply.lease_s or self.transfer_timeout_s)
            async with asyncio.timeout(timeout):
                out = await self._sender.open(endpoint, reply.transfer_id, len(positions), timeout_s=timeout, token=reply.transfer_token)
                await out.send([slots[p] for p in positions], 0)
            # Read: the outbox blocks are free again while the acks come.
            self._outbox.give_back(slots)
            slots = []
            async with asyncio.timeout(timeout):
                await out.finish()
            self.counters["stored_blocks"] += len(positions)
        except _FAILURES as exc:
            self.counters["dropped_stores"] += len(keys)
            self._failed("store", exc)
        except Exception:  # noqa: BLE001 - a bug here must not go unnoticed, nor spread
            self.counters["dropped_stores"] += len(keys)
            log.exception("kvstore store failed unexpectedly")
        finally:
            if slots:
                if out is not None:  # abort() returns once nothing reads the outbox blocks
                    with contextlib.suppress(TransferError, OSError, RuntimeError, asyncio.CancelledError):
                        await asyncio.shield(out.abort("engine-side put failed"))
                self._outbox.give_back(slots)

    def _beat(self, hb: KVStoreHeartbeat) -> None:
        self._last_beat = time.monotonic()
        self._beat_lease_s = hb.lease_s

    async def _on_heartbeat(self, msg: Msg) -> None:
        with contextlib.suppress(ProtocolError):
            hb = decode(msg.data, KVStoreHeartbeat)
            if hb.host_id == self.host_id:
                self._beat(hb)
