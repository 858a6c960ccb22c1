"""Serves one engine over NATS: the body of the combined worker and of the prefill and
decode services (their hand-off logic lives in disagg_prefill.py / disagg_decode.py).

It takes GenerateRequests on its own per-instance subject, answers each at once with a
SubmitReply (accepted, or why not), streams TokenDeltas to the asking gateway, honours
CancelRequests, renews its lease with heartbeats, and aborts the requests of a gateway
whose own lease ran out (their client is gone, so their KV must be freed).

Heartbeats go out from their own thread and connection (rtpllm.serving.liveness), so a
busy event loop cannot starve them; gateways' leases are judged on a clock that stops
while this process's loop is stalled. The server holds at most `max_num_seqs` running
plus `max_waiting_seqs` waiting sequences; beyond that it refuses new requests with
`overloaded`, and the gateway tries another instance or answers 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from rtpllm.engine.validation import validate_prompt
from rtpllm.protocol import subjects
from rtpllm.protocol.convert import delta_from_output, params_from_spec
from rtpllm.protocol.messages import (
    CancelRequest,
    Discover,
    ErrorCode,
    ErrorInfo,
    GatewayHeartbeat,
    GenerateRequest,
    Heartbeat,
    InstanceLoad,
    KVSnapshot,
    KVSnapshotRequest,
    Leave,
    ProtocolError,
    StatusQuery,
    StatusReply,
    SubmitReply,
    TokenDelta,
    Usage,
    decode,
    encode,
)
from rtpllm.protocol.parts import snapshot_parts
from rtpllm.protocol.subjects import InstanceRole
from rtpllm.routing.lease import PeerLease
from rtpllm.sampling_params import SamplingParams
from rtpllm.serving.engine_info import EngineInfo, ServedEngine
from rtpllm.serving.kv_events import KVEventPublisher
from rtpllm.serving.liveness import HeartbeatThread, LoopWatch

if TYPE_CHECKING:
    from rtpllm.multimodal.inputs import MultimodalInputs
    from rtpllm.serving.disagg_decode import DecodeSide
    from rtpllm.serving.disagg_prefill import PrefillSide
    from rtpllm.serving.vision_client import ImageResolver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineServerConfig:
    """How an engine server announces itself and how long it holds things."""

    instance_id: str
    role: InstanceRole = InstanceRole.WORKER
    heartbeat_interval_s: float = 1.0
    lease_s: float = 3.0  # a gateway drops this instance after this long without a heartbeat
    # Lease assumed for a gateway not heard from yet (its heartbeat may still be on its way).
    default_gateway_lease_s: float = 3.0
    # Our heartbeats stop once our event loop has been stalled this long: a hung
    # process must still lose its lease.
    max_loop_stall_s: float = 30.0
    # Sequences (requests x n) allowed to wait beyond the engine's max_num_seqs running
    # ones; None: 4 x max_num_seqs. Past that, new requests are refused (`overloaded`).
    max_waiting_seqs: int | None = None


@dataclass
class _Running:
    task: asyncio.Task[None]
    gateway_id: str
    seqs: int = 1  # sequences it holds in the engine (its n)
    # Set before the task is cancelled: which error (if any) the client should get.
    cancel_error: ErrorInfo | None = None


class EngineServer:
    """NATS front of one engine instance. `start()`, then `drain()` to stop."""

    def __init__(
        self,
        nc: NATS,
        engine: ServedEngine,
        info: EngineInfo,
        config: EngineServerConfig,
        kv_events: KVEventPublisher | None = None,
        prefill: PrefillSide | None = None,
        decode: DecodeSide | None = None,
        images: ImageResolver | None = None,
        watch: LoopWatch | None = None,
    ) -> None:
        subjects.check_id(config.instance_id, "instance id")
        self._nc = nc
        self._engine = engine
        self._info = info
        self._config = config
        self._kv_events = kv_events
        self._prefill = prefill
        self._decode = decode
        # Vision-language models: how a request's images become embeddings.
        self._images = images
        self._running: dict[str, _Running] = {}
        self._seqs = 0  # sequences of the requests in _running that count against the queue bound
        waiting = config.max_waiting_seqs if config.max_waiting_seqs is not None else 4 * info.max_num_seqs
        self.max_seqs = info.max_num_seqs + waiting
        self._gateways: dict[str, PeerLease] = {}  # each gateway's lease as this instance sees it
        self._subs: list[Subscription] = []
        self._generate_sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._state = "ready"
        self._hb_seq = itertools.count(1)  # next() is atomic: heartbeats are built on another thread
        self._started_at = time.time()
        # Gateways' leases are judged on a clock that stops while our loop is stalled (the
        # worker shares it with its decode side and vision client: `watch`).
        self.watch = watch or LoopWatch()
        self._beats = HeartbeatThread(
            nc, subjects.HEARTBEAT, lambda: encode(self.heartbeat_message()), config.heartbeat_interval_s,
            f"heartbeat-{config.instance_id}", self.watch, config.max_loop_stall_s,
        )  # fmt: skip
        self.stopped = asyncio.Event()  # set when the engine died: the process should exit

    @property
    def instance_id(self) -> str:
        return self._config.instance_id

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        role = self._config.role
        self._generate_sub = await self._nc.subscribe(
            subjects.generate_subject(self.instance_id, role), cb=self._on_generate
        )
        self._subs = [
            await self._nc.subscribe(subjects.cancel_subject(self.instance_id, role), cb=self._on_cancel),
            await self._nc.subscribe(subjects.status_subject(self.instance_id, role), cb=self._on_status),
            await self._nc.subscribe(subjects.DISCOVER, cb=self._on_discover),
            await self._nc.subscribe(subjects.GATEWAY_HEARTBEAT, cb=self._on_gateway_heartbeat),
            await self._nc.subscribe(subjects.kv_snapshot_subject(self.instance_id), cb=self._on_kv_snapshot),
        ]
        if self._decode is not None:
            await self._decode.start()
        await self._nc.flush()
        self.watch.start()
        await self._beats.start()  # registered with every gateway now, not one interval from now
        self._tasks = [asyncio.create_task(self._watch_loop(), name="lease-watch")]
        log.info(
            "instance %s serving %s (max_model_len %d)",
            self.instance_id,
            self._info.model,
            self._info.max_model_len,
        )

    async def drain(self, timeout_s: float) -> None:
        """Stop taking requests, let running ones finish for up to `timeout_s`, fail the
        rest with a clear error, then say goodbye. Every stream gets its end."""
        if self._state == "stopped":
            return
        self._state = "draining"
        if self._generate_sub is not None:
            # Gateways still routing here get "no responders" and pick another instance.
            with contextlib.suppress(Exception):
                await self._generate_sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._beats.beat()  # says `draining`
        deadline = time.monotonic() + timeout_s
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._running:
            log.warning("failing %d request(s) still running at shutdown", len(self._running))
            await self._cancel_all(
                ErrorInfo(
                    ErrorCode.WORKER_SHUTDOWN,
                    f"instance {self.instance_id} shut down before the request finished",
                )
            )
        self._state = "stopped"
        if self._decode is not None:
            await self._decode.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        # No heartbeat may follow the Leave (gateways would ignore it, but it would be a lie).
        await self._beats.stop()
        self.watch.stop()
        with contextlib.suppress(Exception):
            await self._nc.publish(subjects.LEAVE, encode(Leave(instance_id=self.instance_id)))
            for sub in self._subs:
                await sub.unsubscribe()
            await self._nc.flush(timeout=2)

    async def _cancel_all(self, error: ErrorInfo) -> None:
        running = list(self._running.values())
        for item in running:
            item.cancel_error = error
            item.task.cancel()
        # Bounded: a cancelled request only has to publish its error delta.
        await asyncio.wait([item.task for item in running], timeout=5)

    # -- requests --------------------------------------------------------------------

    async def _on_generate(self, msg: Msg) -> None:
        try:
            req = decode(msg.data, GenerateRequest)
        except ProtocolError as exc:
            log.warning("bad GenerateRequest: %s", exc)
            if msg.reply:
                await msg.respond(
                    encode(
                        SubmitReply(
                            request_id="",
                            accepted=False,
                            error=ErrorInfo(ErrorCode.INVALID_REQUEST, str(exc)),
                        )
                    )
                )
            return
        params, error = self._admit(req)
        if error is None and params is not None:
            task = asyncio.create_task(self._serve(req, params), name=f"request-{req.request_id}")
            seqs = params.n if req.handoff is None else 0  # hand-offs are bounded by their decode instance
            self._running[req.request_id] = _Running(task, req.gateway_id, seqs)
            self._seqs += seqs
            task.add_done_callback(lambda _, n=seqs: self._release_seqs(n))
            if req.gateway_id not in self._gateways:
                self._gateways[req.gateway_id] = PeerLease(
                    self.watch.clock(), self._config.default_gateway_lease_s
                )
        if msg.reply:
            await msg.respond(
                encode(SubmitReply(request_id=req.request_id, accepted=error is None, error=error))
            )

    def _release_seqs(self, n: int) -> None:
        self._seqs -= n

    def _admit(self, req: GenerateRequest) -> tuple[SamplingParams | None, ErrorInfo | None]:
        """Cheap checks before accepting, so a bad request is refused synchronously (the
        gateway turns that into an HTTP 400 instead of a failed stream)."""
        if self._state != "ready":
            return None, ErrorInfo(ErrorCode.DRAINING, f"instance {self.instance_id} is shutting down")
        if req.model != self._info.model:
            return None, ErrorInfo(
                ErrorCode.MODEL_MISMATCH, f"instance serves {self._info.model!r}, not {req.model!r}"
            )
        if req.deadline <= time.time():
            return None, ErrorInfo(
                ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before it started"
            )
        if req.request_id in self._running:
            return None, ErrorInfo(
                ErrorCode.INVALID_REQUEST, f"request id {req.request_id!r} is already running"
            )
        if req.images and self._images is None:
            return None, ErrorInfo(ErrorCode.INVALID_REQUEST, f"model {self._info.model!r} does not take images")
        if (req.handoff is not None) != (self._prefill is not None):
            what = (
                "takes hand-offs from decode instances only"
                if self._prefill is not None
                else "is not a prefill instance"
            )
            return None, ErrorInfo(ErrorCode.INVALID_REQUEST, f"instance {self.instance_id} {what}")
        try:
            params = params_from_spec(req.sampling)
        except (ValueError, TypeError) as exc:
            return None, ErrorInfo(ErrorCode.INVALID_REQUEST, str(exc))
        try:
            validate_prompt(req.prompt_token_ids, self._info.vocab_size, self._info.max_model_len)
        except ValueError as exc:
            return None, ErrorInfo(ErrorCode.INVALID_REQUEST, str(exc))
        if req.handoff is None and self._seqs + params.n > self.max_seqs:
            return None, ErrorInfo(
                ErrorCode.OVERLOADED,
                f"instance {self.instance_id} is full: {self._seqs} sequences running or waiting (at most {self.max_seqs})",
            )
        return params, None

    async def _serve_handoff(self, req: GenerateRequest, params: SamplingParams) -> None:
        """Prefill side: errors go to the decode instance, never to the client."""
        assert self._prefill is not None
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout_at(loop.time() + (req.deadline - time.time())):
                resolver = self._images

                def images() -> Awaitable[MultimodalInputs]:
                    assert resolver is not None  # _admit refused images otherwise
                    return resolver.resolve(req.request_id, req.images, req.deadline)

                await self._prefill.serve(req, params, self._publish, images if req.images else None)
        except TimeoutError:
            log.warning("hand-off %s passed its deadline", req.request_id)
        finally:
            self._running.pop(req.request_id, None)

    async def _publish(self, subject: str, delta: TokenDelta) -> None:
        await self._nc.publish(subject, encode(delta, self._nc.max_payload))

    async def _serve(self, req: GenerateRequest, params: SamplingParams) -> None:
        if req.handoff is not None:
            await self._serve_handoff(req, params)
            return
        rid = req.request_id
        seq = 0
        completion_tokens = 0

        async def send(delta: TokenDelta) -> None:
            nonlocal seq
            delta.seq = seq
            # A delta over the server's max_payload (prompt logprobs of a long prompt)
            # raises MessageTooLarge, a ValueError: the request fails with an error that
            # names it, numbered as the next delta (no gap at the gateway).
            data = encode(delta, self._nc.max_payload)
            seq += 1
            await self._nc.publish(req.reply_to, data)

        error: ErrorInfo | None = None
        handoff: asyncio.Task[None] | None = None
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout_at(loop.time() + (req.deadline - time.time())):
                mm = None
                if req.images:
                    assert self._images is not None  # _admit refused it otherwise
                    mm = await self._images.resolve(rid, req.images, req.deadline)
                # An image prompt handed off still has its embeddings here: the hand-off
                # carries the images to the prefill instance, which gets its own (a
                # vision service answers it from its cache), and a failed hand-off
                # prefills here with these.
                remote = self._decode.plan(len(req.prompt_token_ids), params) if self._decode is not None else None
                extra = {"multimodal": mm} if mm is not None else {}
                if remote is None:
                    stream = self._engine.generate(rid, req.prompt_token_ids, params, **extra)
                else:
                    stream = self._engine.generate(rid, req.prompt_token_ids, params, remote=remote, **extra)
                    assert self._decode is not None
                    handoff = asyncio.create_task(self._decode.run(req, remote), name=f"handoff-{rid}")
                async with contextlib.aclosing(stream):  # type: ignore[type-var]
                    async for out in stream:
                        delta = delta_from_output(out, seq)
                        completion_tokens += sum(len(c.token_ids) for c in delta.choices)
                        if out.finished and delta.error is None:
                            delta.usage = Usage(
                                len(req.prompt_token_ids), completion_tokens, out.num_cached_tokens
                            )
                        await send(delta)
                        if out.finished:
                            return
            error = ErrorInfo(ErrorCode.ENGINE_ERROR, "the engine ended the stream without a final output")
        except TimeoutError:
            error = ErrorInfo(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        except ValueError as exc:  # the engine's own validation: the client's fault
            error = ErrorInfo(ErrorCode.INVALID_REQUEST, str(exc))
        except asyncio.CancelledError:
            item = self._running.get(rid)
            if item is not None and item.cancel_error is not None:
                with contextlib.suppress(Exception):
                    await send(TokenDelta(request_id=rid, seq=0, finished=True, error=item.cancel_error))
            raise
        except Exception as exc:  # EngineDeadError and anything unexpected: fail this stream only
            log.exception("request %s failed", rid)
            error = ErrorInfo(ErrorCode.ENGINE_ERROR, f"engine error: {exc}")
        finally:
            self._running.pop(rid, None)
            if handoff is not None and not handoff.done():
                handoff.cancel()
                with contextlib.suppress(BaseException):
                    await handoff
        if error is not None:
            with contextlib.suppress(Exception):
                await send(TokenDelta(request_id=rid, seq=0, finished=True, error=error))

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = decode(msg.data, CancelRequest)
        except ProtocolError as exc:
            log.warning("bad CancelRequest: %s", exc)
            return
        item = self._running.get(cancel.request_id)
        if item is not None:
            log.debug("cancel %s (%s)", cancel.request_id, cancel.reason)
            item.task.cancel()  # closing the engine stream aborts the request, freeing its KV

    async def _on_status(self, msg: Msg) -> None:
        """Which of a gateway's quiet requests this instance still runs (the gateway fails
        the others: their final deltas were lost in transit)."""
        try:
            query = decode(msg.data, StatusQuery)
        except ProtocolError as exc:
            log.warning("bad StatusQuery: %s", exc)
            return
        running = [rid for rid in query.request_ids if rid in self._running]
        with contextlib.suppress(Exception):
            await msg.respond(encode(StatusReply(running=running)))

    # -- leases ----------------------------------------------------------------------

    async def _on_discover(self, msg: Msg) -> None:
        with contextlib.suppress(ProtocolError):
            decode(msg.data, Discover)
            await self._beats.beat()

    async def _on_kv_snapshot(self, msg: Msg) -> None:
        """A router asks for our whole prefix cache (it missed KV events)."""
        reader = getattr(self._engine, "cached_block_keys", None)
        if reader is None or not msg.reply:
            return
        try:
            decode(msg.data, KVSnapshotRequest)
            cached = await reader()
        except Exception as exc:  # a bad request or a dead engine: the router retries later
            log.warning("KV snapshot failed: %s", exc)
            return
        snapshot = KVSnapshot(
            instance_id=self.instance_id, seq=cached.seq, block_keys=cached.gpu, host_block_keys=cached.host
        )
        try:
            # A large pool's snapshot passes max_payload: it goes out in parts.
            parts = snapshot_parts(snapshot, self._nc.max_payload)
        except ProtocolError as exc:
            log.error("KV snapshot not sent: %s", exc)
            return
        for data in parts:
            await msg.respond(data)

    async def _on_gateway_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decode(msg.data, GatewayHeartbeat)
        except ProtocolError:
            return
        now = self.watch.clock()
        self._gateways.setdefault(hb.gateway_id, PeerLease(now, hb.lease_s)).renew(now, hb.lease_s)

    def heartbeat_message(self) -> Heartbeat:
        """This instance's heartbeat, from the engine's current stats (called on the
        heartbeat thread: it only reads)."""
        stats = self._engine.stats()
        load = InstanceLoad(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            num_inflight=len(self._running),
            kv_usage=stats.kv_usage,
            num_free_blocks=stats.num_free_blocks,
            num_blocks=stats.num_blocks,
            prefix_hit_ratio=stats.prefix_hit_ratio,
            prompt_tokens=stats.prompt_tokens,
            generation_tokens=stats.generation_tokens,
            num_preemptions=stats.num_preemptions,
            num_awaiting_kv=getattr(stats, "num_awaiting_kv", 0),
            num_held_kv=getattr(stats, "num_held_kv", 0),
            prefix_queried_tokens=getattr(stats, "prefix_queried_tokens", 0),
            tier_hit_tokens=dict(getattr(stats, "tier_hit_tokens", {})),
            spec_proposed_tokens=getattr(stats, "spec_proposed_tokens", 0),
            spec_accepted_tokens=getattr(stats, "spec_accepted_tokens", 0),
            spec_acceptance_lengths=dict(getattr(stats, "spec_acceptance_lengths", {})),
            spec_chosen_k=dict(getattr(stats, "spec_chosen_k", {})),
        )
        return Heartbeat(
            instance_id=self.instance_id,
            role=self._config.role.value,
            model=self._info.model,
            max_model_len=self._info.max_model_len,
            max_num_seqs=self._info.max_num_seqs,
            block_size=self._info.block_size,
            kv_namespace=self._info.kv_namespace,
            lease_s=self._config.lease_s,
            seq=next(self._hb_seq),
            state="ready" if self._state == "ready" else "draining",
            started_at=self._started_at,
            kv_event_seq=self._kv_events.last_seq if self._kv_events is not None else -1,
            load=load,
            disagg=side.counters() if (side := self._prefill or self._decode) is not None else None,
            kvstore_host=getattr(stats, "kvstore_host", ""),
            images=self._images.heartbeat_counters() if self._images is not None else None,
        )

    async def _watch_loop(self) -> None:
        """Abort requests of gateways whose lease ran out; notice a dead engine."""
        while True:
            await asyncio.sleep(0.5)
            if not self._engine.is_alive:
                log.error("the engine died; failing running requests and stopping")
                self.stopped.set()
                return
            now = self.watch.clock()
            for gateway_id, lease in list(self._gateways.items()):
                if now <= lease.expires_at:
                    continue
                orphans = [item for item in self._running.values() if item.gateway_id == gateway_id]
                if orphans:
                    log.warning("gateway %s is gone; aborting its %d request(s)", gateway_id, len(orphans))
                    silent_s = now - lease.last_seen
                    for item in orphans:
                        # Still say so: the gateway may be alive behind a NATS outage
                        # that only this side's lease noticed, and would otherwise wait
                        # for a stream that will never end.
                        item.cancel_error = item.cancel_error or ErrorInfo(
                            ErrorCode.WORKER_LOST,
                            f"instance {self._config.instance_id} heard nothing from gateway {gateway_id} "
                            f"for {silent_s:.1f} s and aborted the request",
                        )
                        item.task.cancel()
                else:
                    del self._gateways[gateway_id]
