"""An engine's side of multimodal serving: turning a GenerateRequest's images into the
`MultimodalInputs` the engine takes, through the vision service or in process.

`ImageResolver.resolve` decides per request:

- **remote** (the vision service) when one of this model's vision instances is alive and
  the request has at least `local_encode_below` image tokens: the engine reserves blocks
  of its embedding pool, sends an EncodeRequest to the services' queue group, and gets
  the rows over the data plane; the images reach the engine as embeddings;
- **local** otherwise, or when the remote path fails for any reason but a bad image (no
  taker, the taker died -- its heartbeats stop -- a full pool, a failed transfer): the
  images are decoded and preprocessed here, off the event loop, and the engine's own
  tower encodes them in its step (engine/multimodal.py).

A bad image (corrupt, or its bytes, size or placeholders disagree with its spec) is the
client's fault, a ValueError, whichever path finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from rtpllm.multimodal.embedding_pool import EmbeddingPool
from rtpllm.multimodal.encoder import image_from_spec, metadata_from_spec
from rtpllm.multimodal.families import VisionFamily
from rtpllm.multimodal.inputs import ImageInput, MultimodalInputs
from rtpllm.protocol import subjects
from rtpllm.protocol.messages import (
    DataPlaneEndpoint,
    EncodeAccepted,
    EncodeDone,
    EncodeRequest,
    ErrorCode,
    ImageCounters,
    ImageSpec,
    ProtocolError,
    VisionHeartbeat,
    decode,
    encode,
)
from rtpllm.routing.lease import PeerLease
from rtpllm.tokenizer import Tokenizer
from rtpllm.transfer import KVReceiver

log = logging.getLogger(__name__)


class VisionUnavailable(RuntimeError):
    """The vision service could not encode these images (encode them here instead)."""


@dataclass(frozen=True)
class VisionClientConfig:
    # A vision instance takes the request within this (it answers before any work; a
    # loaded host can still take a second or two; no instance at all fails at once).
    accept_timeout_s: float = 3.0
    transfer_lease_s: float = 30.0  # the embeddings land within this after sending
    watch_interval_s: float = 0.2  # how often a taken request checks its taker's lease


@dataclass
class _Vision:
    lease: PeerLease  # stretched to the heartbeat intervals observed (rtpllm.routing.lease)
    state: str


class VisionClient:
    """The engine's way to the vision services of its model (embedding namespace)."""

    def __init__(
        self, nc: NATS, instance_id: str, pool: EmbeddingPool, receiver: KVReceiver,
        config: VisionClientConfig = VisionClientConfig(), clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        # `clock`: the engine server's, which stands still while this process's loop is
        # stalled, so a vision instance is never presumed dead for heartbeats we could not read.
        self._clock = clock
        self._nc = nc
        self._instance_id = instance_id
        self.pool = pool
        self._receiver = receiver
        self.config = config
        self.namespace = pool.layout.namespace
        self._visions: dict[str, _Vision] = {}
        self._done: dict[str, asyncio.Future[EncodeDone]] = {}
        self._subs: list[Subscription] = []
        self._ids = itertools.count()

    async def start(self) -> None:
        self._subs = [
            await self._nc.subscribe(subjects.VISION_HEARTBEAT, cb=self._on_heartbeat),
            await self._nc.subscribe(subjects.encoded_subject(self._instance_id), cb=self._on_done),
        ]

    async def close(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self._receiver.close()

    def available(self) -> bool:
        """Whether a vision instance of this model is alive and taking requests."""
        now = self._clock()
        return any(v.state == "ready" and now <= v.lease.expires_at for v in self._visions.values())

    def describe(self) -> str:
        """The vision instances known, for a log line: state, seconds since last heard,
        and the lease they hold."""
        now = self._clock()
        if not self._visions:
            return "no heartbeat seen"
        return ", ".join(
            f"{iid}: {v.state}, heard {now - v.lease.last_seen:.1f} s ago, lease {v.lease.expires_at - v.lease.last_seen:.1f} s"
            for iid, v in self._visions.items()
        )

    def _alive(self, instance_id: str) -> bool:
        v = self._visions.get(instance_id)
        return v is not None and self._clock() <= v.lease.expires_at

    async def encode(self, request_id: str, images: list[ImageSpec], deadline: float) -> list[torch.Tensor]:
        """The embedding rows of each image. ValueError for a bad image; VisionUnavailable
        for anything else that went wrong (nothing is left held either way)."""
        rows = [sum(length for _, length in spec.runs) for spec in images]
        blocks = [self.pool.blocks_for(n) for n in rows]
        ids = self.pool.alloc(sum(blocks))
        if ids is None:
            raise VisionUnavailable(f"the embedding pool has {self.pool.num_free} free blocks, {sum(blocks)} needed")
        encode_id = f"{request_id}.{next(self._ids)}"
        incoming = self._receiver.expect(encode_id, ids, min(self.config.transfer_lease_s, max(0.1, deadline - time.time())))
        done: asyncio.Future[EncodeDone] = asyncio.get_running_loop().create_future()
        self._done[encode_id] = done
        landed = False
        try:
            ep = self._receiver.endpoint
            message = EncodeRequest(
                request_id=encode_id, namespace=self.namespace, images=images, blocks=blocks,
                endpoint=DataPlaneEndpoint(host=ep.host, port=ep.port, host_id=ep.host_id, device=ep.device, backends=list(ep.backends)),
                transfer_id=encode_id, transfer_token=incoming.token,
                reply_to=subjects.encoded_subject(self._instance_id), deadline=deadline,
            )  # fmt: skip
            try:
                data = encode(message, self._nc.max_payload)
                reply = await self._nc.request(subjects.vision_encode_subject(self.namespace), data, timeout=self.config.accept_timeout_s)
                accepted = decode(reply.data, EncodeAccepted)
            except (ProtocolError, TimeoutError, OSError) as exc:
                raise VisionUnavailable(f"no vision instance took the request: {exc!r}") from exc
            except Exception as exc:  # nats' NoRespondersError and friends
                raise VisionUnavailable(f"no vision instance took the request: {exc!r}") from exc
            if accepted.error is not None:
                raise VisionUnavailable(f"vision instance {accepted.instance_id} refused: {accepted.error.message}")
            result = await self._watch(done, accepted.instance_id, deadline)
            if result.error is not None:
                if result.error.code == ErrorCode.INVALID_REQUEST:
                    raise ValueError(result.error.message)
                raise VisionUnavailable(f"vision instance {result.instance_id}: {result.error.message}")
            try:
                await incoming.wait()
            except Exception as exc:
                raise VisionUnavailable(f"the embeddings did not arrive: {exc!r}") from exc
            landed = True
            out, first = [], 0
            for n, count in zip(rows, blocks, strict=True):
                out.append(self.pool.read(ids[first : first + count], n))
                first += count
            return out
        finally:
            self._done.pop(encode_id, None)
            if not landed:
                incoming.cancel()
                with contextlib.suppress(Exception):
                    await incoming.wait()  # no write into the blocks after this
            self.pool.free(ids)

    async def _watch(self, done: asyncio.Future[EncodeDone], taker: str, deadline: float) -> EncodeDone:
        """The taker's answer, unless its lease lapses (killed, hung) or the deadline passes."""
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise VisionUnavailable("the request's deadline passed while the vision service encoded it")
            finished, _ = await asyncio.wait({done}, timeout=min(self.config.watch_interval_s, remaining))
            if finished:
                return done.result()
            if not self._alive(taker):
                raise VisionUnavailable(f"vision instance {taker} went silent while encoding")

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decode(msg.data, VisionHeartbeat)
        except ProtocolError:
            return
        if hb.namespace != self.namespace:
            return
        now = self._clock()
        known = self._visions.setdefault(hb.instance_id, _Vision(PeerLease(now, hb.lease_s), hb.state))
        known.lease.renew(now, hb.lease_s)
        known.state = hb.state

    async def _on_done(self, msg: Msg) -> None:
        try:
            result = decode(msg.data, EncodeDone)
        except ProtocolError:
            return
        future = self._done.get(result.request_id)
        if future is not None and not future.done():
            future.set_result(result)


@dataclass
class ResolverCounters:
    remote_images: int = 0  # images whose embeddings came from the vision service
    local_images: int = 0  # images encoded (or to be encoded) by this engine
    fallbacks: int = 0  # requests the vision service failed and this engine encoded


class ImageResolver:
    """Turns a request's ImageSpecs into MultimodalInputs (see the module docstring)."""

    def __init__(
        self,
        family: VisionFamily,
        tokenizer: Tokenizer,
        client: VisionClient | None = None,
        local_encode_below: int = 0,
        prepare_threads: int | None = None,
        encoded_here: Callable[[], int] = lambda: 0,
    ) -> None:
        self.family = family
        self._encoded_here = encoded_here
        self.tokenizer = tokenizer
        self.client = client
        self.local_encode_below = local_encode_below
        threads = prepare_threads or max(2, min(8, (os.cpu_count() or 2) // 2))
        self._prepare = ThreadPoolExecutor(threads, thread_name_prefix="image-prepare")
        self.counters = ResolverCounters()
        self._said_unavailable = False

    async def resolve(self, request_id: str, images: list[ImageSpec], deadline: float) -> MultimodalInputs:
        tokens = sum(length for spec in images for _, length in spec.runs)
        client = self.client
        available = client is not None and client.available()
        if client is not None and available == self._said_unavailable:
            # Once per change, not per request: a model served without a vision service
            # would say it for every image.
            self._said_unavailable = not available
            if available:
                log.info("a vision instance is alive again: images go to the vision service")
            else:
                log.warning("no live vision instance (%s): encoding images here", client.describe())
        if client is not None and tokens >= self.local_encode_below and available:
            try:
                rows = await client.encode(request_id, images, deadline)
            except VisionUnavailable as exc:
                self.counters.fallbacks += 1
                log.warning("request %s: encoding its %d image(s) here: %s", request_id, len(images), exc)
            else:
                self.counters.remote_images += len(images)
                return MultimodalInputs(tuple(_with_embeddings(metadata_from_spec(s), r) for s, r in zip(images, rows, strict=True)))
        loop = asyncio.get_running_loop()
        # Pixels only: the engine's own tower encodes them in its step, batched with the
        # other requests' images there.
        prepared = await asyncio.gather(*(loop.run_in_executor(self._prepare, image_from_spec, self.family, self.tokenizer, spec) for spec in images))
        self.counters.local_images += len(images)
        return MultimodalInputs(tuple(prepared))

    def heartbeat_counters(self) -> ImageCounters:
        c = self.counters
        return ImageCounters(remote=c.remote_images, local=c.local_images, fallbacks=c.fallbacks, encoded_here=self._encoded_here())

    async def close(self) -> None:
        self._prepare.shutdown(wait=False)
        if self.client is not None:
            await self.client.close()


def _with_embeddings(image: ImageInput, rows: torch.Tensor) -> ImageInput:
    return ImageInput(image.content_hash, image.runs, image.grid_thw, embeddings=rows)
