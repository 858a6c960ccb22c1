"""The vision service: encodes the images of engines' requests, batched across requests,
and keeps the embeddings by content hash.

One instance per GPU (or CPU process); instances of one model share the load as a NATS
queue group on `vision_encode_subject(namespace)`. For an EncodeRequest the taker

1. answers EncodeAccepted at once (the engine then watches this instance's heartbeats:
   if it dies, the engine encodes the images itself);
2. finds each image in its memory cache (the embedding pool: an LRU of blocks by
   content hash), else in the kvstore's tiers (host memory, SSD, Redis) when a kvstore
   is configured, else decodes and preprocesses it (worker threads) and queues it;
3. runs queued images through the tower in batches: whatever is queued when the tower
   frees up (up to `max_batch_images`), after waiting `batch_wait_s` for company;
4. ships the embedding rows over the data plane into the engine's embedding pool, and
   publishes EncodeDone on the engine's subject.

Two requests for one image while it is encoding share the encode. Failures are the
request's (EncodeDone with an error): a bad image is INVALID_REQUEST, a full cache or a
failed transfer ENGINE_ERROR; the service keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from rtpllm.kvstore.engine_store import EngineKVStore
from rtpllm.multimodal.embedding_pool import EmbeddingPool, embedding_keys
from rtpllm.multimodal.encoder import VisionEncoder
from rtpllm.multimodal.image_input import ImageLimits
from rtpllm.multimodal.inputs import ImageInput
from rtpllm.protocol import subjects
from rtpllm.protocol.messages import (
    EncodeAccepted,
    EncodeDone,
    EncodeRequest,
    ErrorCode,
    ErrorInfo,
    ImageSpec,
    ProtocolError,
    VisionCounters,
    VisionHeartbeat,
    decode,
    encode,
)
from rtpllm.transfer import KVEndpoint, KVSender, TransferError

log = logging.getLogger("rtpllm.vision")

# Tests only: seconds every taken request waits before its work (a vision instance that
# can be killed mid-request).
FAULT_STALL_ENV = "RTPLLM_FAULT_VISION_STALL_S"


@dataclass(frozen=True)
class VisionServerConfig:
    instance_id: str
    model: str
    max_batch_images: int = 16
    batch_wait_s: float = 0.002
    heartbeat_interval_s: float = 1.0
    lease_s: float = 3.0
    transfer_timeout_s: float = 10.0
    # Decoding and preprocessing (PIL and torch release the GIL): half the cores, 2-8.
    prepare_threads: int = field(default_factory=lambda: max(2, min(8, (os.cpu_count() or 2) // 2)))
    limits: ImageLimits = field(default_factory=ImageLimits)


class CacheFull(RuntimeError):
    """Every block of the embedding pool holds an image some request still needs."""


@dataclass
class _Entry:
    block_ids: list[int]
    num_rows: int
    pins: int = 0


class EmbeddingCache:
    """The pool's blocks as an LRU of images by content hash. An entry a request still
    ships is pinned; only unpinned entries are evicted."""

    def __init__(self, pool: EmbeddingPool) -> None:
        self.pool = pool
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, digest: str) -> _Entry | None:
        """The cached entry, pinned and made most recent; None on a miss."""
        entry = self._entries.get(digest)
        if entry is not None:
            self._entries.move_to_end(digest)
            entry.pins += 1
        return entry

    def reserve(self, num_rows: int) -> list[int]:
        """Free blocks for `num_rows` rows, evicting least recent unpinned images."""
        need = self.pool.blocks_for(num_rows)
        while self.pool.num_free < need:
            victim = next((d for d, e in self._entries.items() if e.pins == 0), None)
            if victim is None:
                raise CacheFull(f"the embedding cache is full of images in use ({len(self._entries)}); raise --cache-gib")
            self.pool.free(self._entries.pop(victim).block_ids)
        ids = self.pool.alloc(need)
        assert ids is not None
        return ids

    def insert(self, digest: str, block_ids: list[int], num_rows: int) -> _Entry:
        """Cache an image written into `block_ids` (from `reserve`), pinned once."""
        old = self._entries.pop(digest, None)
        if old is not None:  # raced with another writer of the same image
            if old.pins == 0:
                self.pool.free(old.block_ids)
            else:
                self._entries[digest] = old
                self.pool.free(block_ids)
                old.pins += 1
                return old
        entry = self._entries[digest] = _Entry(block_ids, num_rows, pins=1)
        return entry

    def release(self, entry: _Entry) -> None:
        entry.pins -= 1


@dataclass
class _Queued:
    image: ImageInput
    done: asyncio.Future[_Entry]


class VisionServer:
    """Serves encode requests for one model. `start()`, then `close()`.

    `tiers`: the kvstore's tiers seen through the embedding pool (a RemoteKVStore over
    `pool.kv`), or None for the memory cache alone."""

    def __init__(
        self,
        nc: NATS,
        encoder: VisionEncoder,
        pool: EmbeddingPool,
        config: VisionServerConfig,
        *,
        tiers: EngineKVStore | None = None,
        sender: KVSender | None = None,
    ) -> None:
        subjects.check_id(config.instance_id, "instance id")
        self._nc = nc
        self.encoder = encoder
        self.pool = pool
        self.cache = EmbeddingCache(pool)
        self.config = config
        self.tiers = tiers
        self.namespace = pool.layout.namespace
        self._sender = sender or KVSender(pool.kv, pool.layout, prefer=("cuda_ipc", "shm", "tcp"))
        self._queue: list[_Queued] = []
        self._wake = asyncio.Event()
        self._encoding: dict[str, asyncio.Future[_Entry]] = {}  # content hash -> its encode
        self._prepare = ThreadPoolExecutor(config.prepare_threads, thread_name_prefix="vision-prepare")
        self._tower = ThreadPoolExecutor(1, thread_name_prefix="vision-tower")  # one batch at a time
        self._io = ThreadPoolExecutor(2, thread_name_prefix="vision-tiers")
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._seq = 0
        self._state = "ready"
        self.counters = VisionCounters()
        self._stall_s = float(os.environ.get(FAULT_STALL_ENV, "0") or 0)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        subject = subjects.vision_encode_subject(self.namespace)
        self._subs.append(await self._nc.subscribe(subject, queue=subjects.VISION_QUEUE, cb=self._on_encode))
        self._loops.append(asyncio.create_task(self._batch_loop(), name="vision-batches"))
        self._loops.append(asyncio.create_task(self._heartbeat_loop(), name="vision-heartbeat"))
        await self._beat()

    async def close(self, drain_s: float = 5.0) -> None:
        """Stop taking requests, finish the taken ones (up to `drain_s`), stop."""
        self._state = "draining"
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._beat()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=drain_s)
        for task in [*self._tasks, *self._loops]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._loops, return_exceptions=True)
        await self._sender.close()
        for pool in (self._prepare, self._tower, self._io):
            pool.shutdown(wait=False)
        if self.tiers is not None:
            await asyncio.to_thread(self.tiers.close)

    def heartbeat(self) -> VisionHeartbeat:
        self._seq += 1
        return VisionHeartbeat(
            instance_id=self.config.instance_id, model=self.config.model, namespace=self.namespace, seq=self._seq,
            lease_s=self.config.lease_s, state=self._state, queued_images=len(self._queue),
            cached_images=len(self.cache), counters=self.counters,
        )  # fmt: skip

    # -- requests ---------------------------------------------------------------------

    async def _on_encode(self, msg: Msg) -> None:
        try:
            req = decode(msg.data, EncodeRequest)
        except ProtocolError as exc:
            await self._answer(msg, EncodeAccepted(request_id="", instance_id=self.config.instance_id, error=_invalid(str(exc))))
            return
        error = None
        if self._state != "ready":
            error = ErrorInfo(ErrorCode.DRAINING, f"vision instance {self.config.instance_id} is shutting down")
        elif req.namespace != self.namespace:
            error = ErrorInfo(ErrorCode.MODEL_MISMATCH, "the request's embedding namespace is not this service's model")
        elif len(req.blocks) != len(req.images):
            error = _invalid("blocks and images differ in length")
        await self._answer(msg, EncodeAccepted(request_id=req.request_id, instance_id=self.config.instance_id, error=error))
        if error is None:
            self.counters.requests += 1
            self._spawn(self._serve(req))

    async def _serve(self, req: EncodeRequest) -> None:
        pinned: dict[int, _Entry] = {}  # image index -> its entry, pinned until shipped
        done = EncodeDone(request_id=req.request_id, instance_id=self.config.instance_id)
        try:
            remaining = req.deadline - time.time()
            if remaining <= 0:
                raise TimeoutError("the request's deadline passed")
            async with asyncio.timeout(remaining):
                if self._stall_s:
                    await asyncio.sleep(self._stall_s)
                sources = await asyncio.gather(*(self._embedding(i, spec, pinned) for i, spec in enumerate(req.images)))
                done.encoded = sources.count("encoded")
                done.cache_hits = len(sources) - done.encoded
                await self._ship(req, [pinned[i] for i in range(len(req.images))])
        except ValueError as exc:  # a bad image (ImageError, ImageMismatch)
            done.error = _invalid(str(exc))
        except (TimeoutError, CacheFull, TransferError, OSError, RuntimeError) as exc:
            self.counters.failures += 1
            log.warning("encode request %s failed: %r", req.request_id, exc)
            done.error = ErrorInfo(ErrorCode.ENGINE_ERROR, f"vision service: {exc}")
        finally:
            for entry in pinned.values():
                self.cache.release(entry)
        with contextlib.suppress(Exception):
            await self._nc.publish(req.reply_to, encode(done))

    async def _embedding(self, index: int, spec: ImageSpec, pinned: dict[int, _Entry]) -> str:
        """Pin the image's cache entry into `pinned[index]` (from memory, the tiers or
        the tower); returns where it came from."""
        rows = sum(length for _, length in spec.runs)
        while True:
            entry = self.cache.take(spec.content_hash)
            if entry is not None:
                pinned[index] = entry
                self.counters.memory_hits += 1
                if entry.num_rows != rows:
                    raise ValueError(f"image {spec.content_hash[:12]} has {entry.num_rows} embedding rows, the prompt has {rows}")
                return "memory"
            pending = self._encoding.get(spec.content_hash)
            if pending is None:
                break
            # Another request is encoding (or restoring) it: wait, then take it from the
            # cache (it may be evicted again by then: the loop starts over).
            await asyncio.wait({pending})
            if pending.exception() is not None:
                raise pending.exception()  # type: ignore[misc]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Entry] = loop.create_future()
        self._encoding[spec.content_hash] = future
        try:
            entry = await self._from_tiers(spec, rows)
            source = "tier"
            if entry is None:
                image = await loop.run_in_executor(self._prepare, self.encoder.prepare, spec, self.config.limits)
                queued = _Queued(image, loop.create_future())
                self._queue.append(queued)
                self._wake.set()
                entry = await queued.done
                source = "encoded"
            pinned[index] = entry
            future.set_result(entry)
            return source
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("the encode was cancelled"))
            future.exception()  # marked retrieved: waiters, if any, get it too
            raise
        finally:
            self._encoding.pop(spec.content_hash, None)

    async def _from_tiers(self, spec: ImageSpec, rows: int) -> _Entry | None:
        tiers = self.tiers
        if tiers is None:
            self.counters.misses += 1
            return None
        loop = asyncio.get_running_loop()
        keys = embedding_keys(self.namespace, spec.content_hash, self.pool.blocks_for(rows))
        found = await loop.run_in_executor(self._io, tiers.lookup, keys)
        if len(found) < len(keys):
            self.counters.misses += 1
            return None
        ids = self.cache.reserve(rows)
        restored = await loop.run_in_executor(self._io, tiers.fetch_into, keys, ids)
        if restored < len(keys):
            self.pool.free(ids)
            self.counters.misses += 1
            return None
        self.counters.tier_hits += 1
        return self.cache.insert(spec.content_hash, ids, rows)

    async def _ship(self, req: EncodeRequest, entries: list[_Entry]) -> None:
        for entry, blocks in zip(entries, req.blocks, strict=True):
            if len(entry.block_ids) != blocks:
                raise ValueError(f"the engine reserved {blocks} blocks for an image of {len(entry.block_ids)}")
        endpoint = KVEndpoint(**{f: getattr(req.endpoint, f) for f in req.endpoint.__struct_fields__})
        timeout = max(0.1, min(self.config.transfer_timeout_s, req.deadline - time.time()))
        transfer = await self._sender.open(endpoint, req.transfer_id, sum(req.blocks), timeout, token=req.transfer_token)
        try:
            offset = 0
            for entry in entries:
                await transfer.send(entry.block_ids, offset)
                offset += len(entry.block_ids)
            await transfer.finish()
        except BaseException:
            with contextlib.suppress(Exception):
                await transfer.abort("vision service failed")
            raise
        self.counters.bytes_sent += offset * self.pool.block_bytes

    # -- batching ---------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue:
                continue
            if len(self._queue) < self.config.max_batch_images and self.config.batch_wait_s > 0:
                await asyncio.sleep(self.config.batch_wait_s)  # let concurrent requests join
            batch = self._queue[: self.config.max_batch_images]
            del self._queue[: len(batch)]
            if self._queue:
                self._wake.set()
            t0 = time.perf_counter()
            try:
                rows = await loop.run_in_executor(self._tower, self._encode, [q.image for q in batch])
            except Exception as exc:  # noqa: BLE001 - the batch's requests fail, the service stays
                log.exception("encoding a batch of %d images failed", len(batch))
                for q in batch:
                    if not q.done.done():
                        q.done.set_exception(RuntimeError(f"encoding failed: {exc}"))
                continue
            self.counters.batches += 1
            self.counters.images_encoded += len(batch)
            self.counters.encode_seconds += time.perf_counter() - t0
            for q, embeds in zip(batch, rows, strict=True):
                if q.done.done():
                    continue
                try:
                    ids = self.cache.reserve(embeds.shape[0])
                except CacheFull as exc:
                    q.done.set_exception(exc)
                    continue
                self.pool.write(ids, embeds)
                q.done.set_result(self.cache.insert(q.image.content_hash, ids, embeds.shape[0]))
                self._store(q.image.content_hash, ids)

    def _encode(self, images: list[ImageInput]) -> list[torch.Tensor]:
        out = self.encoder.encode(images)
        if self.pool.kv.is_cuda:
            torch.cuda.current_stream(self.pool.kv.device).synchronize()
        return out

    def _store(self, digest: str, ids: list[int]) -> None:
        """Keep a newly encoded image in the kvstore's tiers too (the client copies the
        blocks out at once and stores in the background: never waits on the network)."""
        if self.tiers is not None:
            keys = embedding_keys(self.namespace, digest, len(ids))
            self.tiers.store_from(keys, ids)

    # -- plumbing ---------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            with contextlib.suppress(Exception):
                await self._beat()

    async def _beat(self) -> None:
        await self._nc.publish(subjects.VISION_HEARTBEAT, encode(self.heartbeat()))

    async def _answer(self, msg: Msg, reply: EncodeAccepted) -> None:
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(encode(reply))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _invalid(message: str) -> ErrorInfo:
    return ErrorInfo(ErrorCode.INVALID_REQUEST, message)
