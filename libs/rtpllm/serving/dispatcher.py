"""The gateway's side of the bus: send requests to engine instances, demultiplex their
token deltas into per-request streams, cancel, and keep instance leases.

One subscription receives every delta addressed to this gateway; a request's stream is
registered before the request is sent, so no delta can arrive unclaimed. A stream always
ends: with its final delta, or with an error when its instance leaves, its lease expires,
a delta goes missing, or the gateway closes.

Liveness (rtpllm.serving.liveness): the gateway's own heartbeat goes out from a thread,
so workers keep its requests while its event loop is busy; instance leases are judged on
a clock that stops while that loop is stalled. An instance dropped for silence is
re-admitted by its next heartbeat; the requests failed when it was dropped stay failed,
and the instance is told to cancel them (again on any late delta of theirs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from rtpllm.protocol import subjects
from rtpllm.protocol.messages import (
    CancelRequest,
    Discover,
    ErrorCode,
    ErrorInfo,
    GatewayHeartbeat,
    GenerateRequest,
    Heartbeat,
    KVEvents,
    KVSnapshot,
    KVSnapshotRequest,
    Leave,
    MessageTooLarge,
    ProtocolError,
    StatusQuery,
    StatusReply,
    SubmitReply,
    TokenDelta,
    decode,
    encode,
)
from rtpllm.protocol.parts import EventParts, SnapshotParts
from rtpllm.routing.instances import Instance, InstanceRegistry
from rtpllm.routing.policy import CacheAware, RouteRequest, RouterPolicy, image_spans
from rtpllm.routing.prefix_index import PrefixIndex
from rtpllm.routing.ttft import TTFTPredictor
from rtpllm.serving.liveness import HeartbeatThread, LoopWatch

log = logging.getLogger(__name__)


class NoInstanceError(RuntimeError):
    """No live instance serves the model (HTTP 503)."""


class InstancesBusy(NoInstanceError):
    """Every instance tried refused the request because its queue is full (HTTP 429)."""

    retry_after_s: int | None = None


class DeadlineUnreachable(InstancesBusy):
    """No instance is predicted to give the request its first token before its deadline
    (HTTP 429 with a Retry-After of about when one would)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SubmitRejected(RuntimeError):
    """The instance refused the request; `error.code` says why."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def too_large_message(request: GenerateRequest, exc: MessageTooLarge) -> str:
    """Why a request does not fit on the bus, in the client's terms: images are what
    usually make it too large (their encoded bytes travel in the request)."""
    image_bytes = sum(len(image.data) for image in request.images)
    if image_bytes:
        return (
            f"the request's images total {image_bytes} bytes, more than the bus carries "
            f"(max_payload {exc.max_payload}; the request encodes to {exc.size} bytes)"
        )
    return f"the prompt is too large to send to an instance: {exc}"


@dataclass(frozen=True)
class DispatcherConfig:
    gateway_id: str
    submit_timeout_s: float = 5.0  # an instance answers a GenerateRequest within this
    heartbeat_interval_s: float = 1.0
    lease_s: float = 3.0  # instances abort this gateway's requests after this much silence
    lease_check_interval_s: float = 0.2
    max_submit_attempts: int = 3
    resync_interval_s: float = 2.0  # at most one KV snapshot request per instance per interval
    snapshot_timeout_s: float = 5.0  # every part of a KV snapshot arrives within this
    # Our heartbeats stop once our event loop has been stalled this long (a hung gateway
    # must still lose its lease, so workers abort its requests).
    max_loop_stall_s: float = 30.0
    # Refuse (429) a request no instance is predicted to start within this many seconds
    # (0: only its deadline counts); rule 3 of docs/architecture.md, rtpllm.routing.ttft.
    max_predicted_ttft_s: float = 0.0
    # A stream without a delta for this long is checked with its instance (StatusQuery);
    # one the instance no longer runs, twice in a row, lost its end in transit.
    stream_quiet_s: float = 3.0
    status_timeout_s: float = 2.0


class RequestStream:
    """The deltas of one request on one instance, in order; iterate with `async for`.

    The last delta yielded has `finished=True` (and `error` if the request failed).

    With disaggregation a request's first delta comes from the prefill instance and
    the rest from the decode instance, which also re-sends the first (a prefill that
    dies after telling the decode instance, but before telling us, must not leave a
    hole). So a delta already seen is dropped, and one that arrives early (at most
    MAX_EARLY ahead) waits for the ones before it; one further ahead reveals a loss.
    """

    MAX_EARLY = 64

    def __init__(self, request_id: str, instance_id: str, on_close: Callable[[RequestStream], None]) -> None:
        self.request_id = request_id
        self.instance_id = instance_id
        self._queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._next_seq = 0
        self._early: dict[int, TokenDelta] = {}
        self._on_close = on_close
        self.finished = False  # nothing more will be yielded
        self.remote_finished = False  # the instance sent its final delta (nothing to cancel)
        self.cancel_sent = False
        self.last_delta = time.monotonic()  # when a delta last arrived (or the stream opened)
        self.pending_prompt_tokens = 0  # counted in the TTFT predictor until the first delta or the close
        self.unknown_to_instance = 0  # status checks in a row that the instance did not run it

    def _push(self, delta: TokenDelta) -> bool:
        """Queue a delta from the bus; False if it revealed a gap (stream failed)."""
        self.last_delta = time.monotonic()
        self.unknown_to_instance = 0
        if self.finished or delta.seq < self._next_seq:
            return True
        if delta.seq > self._next_seq:
            if delta.error is not None:  # an instance's error ends the stream whatever is missing
                self._queue.put_nowait(delta)
                self.remote_finished = True
                self._finish()
                return True
            if delta.seq - self._next_seq <= self.MAX_EARLY:
                self._early[delta.seq] = delta
                return True
            self._fail(ErrorInfo(ErrorCode.LOST_DELTAS, f"token delta {self._next_seq} was lost in transit"))
            return False
        while delta is not None:
            self._next_seq += 1
            self._queue.put_nowait(delta)
            if delta.finished:
                self.remote_finished = True
                self._finish()
                return True
            delta = self._early.pop(self._next_seq, None)
        return True

    def _fail(self, error: ErrorInfo) -> None:
        if self.finished:
            return
        self._queue.put_nowait(
            TokenDelta(request_id=self.request_id, seq=self._next_seq, finished=True, error=error)
        )
        self._finish()

    def _finish(self) -> None:
        self.finished = True
        self._on_close(self)

    def __aiter__(self) -> AsyncIterator[TokenDelta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenDelta]:
        async for batch in self.batches():
            for delta in batch:
                yield delta

    async def batches(self) -> AsyncIterator[list[TokenDelta]]:
        """Deltas in batches: each waits for one, then takes all that are already queued.
        Under load a reader that fell behind catches up in one go (one HTTP write for
        many tokens); when idle every batch is a single delta, so nothing waits."""
        while True:
            batch = [await self._queue.get()]
            while not batch[-1].finished and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            yield batch
            if batch[-1].finished:
                return


class Dispatcher:
    """Routes GenerateRequests to instances and hands back their RequestStreams."""

    MAX_ORPHANS = 4096  # failed requests remembered for cancelling on a late delta

    def __init__(self, nc: NATS, policy: RouterPolicy, config: DispatcherConfig) -> None:
        subjects.check_id(config.gateway_id, "gateway id")
        self._nc = nc
        self.policy = policy
        self.config = config
        # Leases are judged on a clock that stops while our own loop is stalled.
        self.watch = LoopWatch()
        self.registry = InstanceRegistry(self.watch.clock)
        self._beats = HeartbeatThread(
            nc, subjects.GATEWAY_HEARTBEAT, self._gateway_heartbeat, config.heartbeat_interval_s,
            f"heartbeat-{config.gateway_id}", self.watch, config.max_loop_stall_s,
        )  # fmt: skip
        # Which instance caches which blocks: fed by KV events, read by cache-aware routing.
        self.index = policy.index if isinstance(policy, CacheAware) else PrefixIndex()
        self._resync_at: dict[str, float] = {}
        self._event_parts = EventParts()  # KV event batches that came in parts
        self._streams: dict[str, RequestStream] = {}
        self.ttft = TTFTPredictor()
        self._subs: list[Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Fire-and-forget publishes (held: the loop holds tasks weakly).
        self._bg: set[asyncio.Task[None]] = set()
        # Requests failed because their instance was dropped, by request id.
        # A late delta of one means the instance still runs it: it is told to stop.
        self._orphans: OrderedDict[str, tuple[str, str]] = OrderedDict()  # -> (instance id, role)
        self.reply_subject = subjects.deltas_subject(config.gateway_id)
        # Metrics hooks: an instance dropped (with the error code); a routing decision
        # (policy name, reason).
        self.on_instance_lost: Callable[[Instance, str], None] | None = None
        self.on_routed: Callable[[str, str], None] | None = None

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    async def start(self) -> None:
        self._subs = [
            await self._nc.subscribe(self.reply_subject, cb=self._on_delta, pending_msgs_limit=1 << 20),
            await self._nc.subscribe(subjects.HEARTBEAT, cb=self._on_heartbeat),
            await self._nc.subscribe(subjects.LEAVE, cb=self._on_leave),
            await self._nc.subscribe(
                subjects.KV_EVENTS_ALL, cb=self._on_kv_events, pending_msgs_limit=1 << 18
            ),
        ]
        self.watch.start()
        await self._beats.start()  # the first gateway heartbeat is out when this returns
        # Instances answer with a heartbeat now, so a fresh gateway knows them at once.
        await self._nc.publish(subjects.DISCOVER, encode(Discover(gateway_id=self.config.gateway_id)))
        await self._nc.flush()
        self._tasks = [
            asyncio.create_task(self._lease_loop(), name="instance-leases"),
            asyncio.create_task(self._status_loop(), name="stream-status"),
        ]

    async def close(self) -> None:
        """Cancel every open request on its instance and fail its stream."""
        for task in self._tasks:
            task.cancel()
        await self._beats.stop()
        self.watch.stop()
        for stream in list(self._streams.values()):
            self.cancel(stream, "gateway_shutdown")
            stream._fail(ErrorInfo(ErrorCode.CANCELLED, "the gateway is shutting down"))
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=2)
        with contextlib.suppress(Exception):
            for sub in self._subs:
                await sub.unsubscribe()
            await self._nc.flush(timeout=2)

    # -- requests --------------------------------------------------------------------

    def candidates(self, model: str) -> list[Instance]:
        return self.registry.candidates(model)

    async def submit(self, request: GenerateRequest) -> RequestStream:
        """Send the request to an instance chosen by the policy; return its stream.

        An instance that turns out to be gone (no subscriber), busy answering or draining
        is skipped and another tried. Raises NoInstanceError when none is left, and
        SubmitRejected when an instance refused the request itself (bad input, deadline).
        """
        request.reply_to = self.reply_subject
        request.gateway_id = self.config.gateway_id
        try:
            data = encode(request, self._nc.max_payload)
        except MessageTooLarge as exc:  # a huge token-id prompt or images: no instance could take it
            raise SubmitRejected(ErrorInfo(ErrorCode.INVALID_REQUEST, too_large_message(request, exc))) from exc
        except (msgspec.EncodeError, OverflowError) as exc:  # an integer beyond 64 bits, say: the client's value
            raise SubmitRejected(ErrorInfo(ErrorCode.INVALID_REQUEST, f"a value in the request cannot be sent on: {exc}")) from exc
        route = RouteRequest(request.request_id, request.model, request.prompt_token_ids, image_spans(request.images))
        tried: set[str] = set()
        busy = 0  # instances that refused because their queue is full
        for _ in range(self.config.max_submit_attempts):
            candidates = [inst for inst in self.candidates(request.model) if inst.instance_id not in tried]
            if not candidates:
                break
            self._check_ttft(request, candidates)
            inst = self.policy.choose(route, candidates)
            if self.on_routed is not None:
                self.on_routed(self.policy.name, self.policy.last_reason)
            tried.add(inst.instance_id)
            stream = self._open(request.request_id, inst)
            stream.pending_prompt_tokens = len(request.prompt_token_ids)
            self.ttft.add_pending(inst.instance_id, stream.pending_prompt_tokens)
            try:
                msg = await self._nc.request(
                    subjects.generate_subject(inst.instance_id, inst.heartbeat.role),
                    data,
                    timeout=self.config.submit_timeout_s,
                )
                reply = decode(msg.data, SubmitReply)
            except nats.errors.NoRespondersError:
                # Its subscription is gone: killed (lease expiry will follow) or draining
                # (its next heartbeat says so). Route elsewhere until we hear from it.
                log.warning("instance %s has no responders; trying another", inst.instance_id)
                self.registry.mark_unreachable(inst.instance_id)
                self._close_quietly(stream)
                continue
            except (nats.errors.TimeoutError, ProtocolError) as exc:
                log.warning("instance %s did not accept %s: %s", inst.instance_id, request.request_id, exc)
                # It may still start the request late: tell it not to.
                self.cancel(stream, "submit_timeout")
                continue
            except BaseException:  # cancelled while waiting (client gone): leave nothing behind
                self.cancel(stream, ErrorCode.CANCELLED)
                raise
            if reply.accepted:
                return stream
            self._close_quietly(stream)
            assert reply.error is not None
            if reply.error.code in (ErrorCode.DRAINING, ErrorCode.MODEL_MISMATCH):
                continue
            if reply.error.code == ErrorCode.OVERLOADED:
                busy += 1
                continue
            raise SubmitRejected(reply.error)
        if busy:
            raise InstancesBusy(f"the queue of every instance tried ({busy}) is full")
        raise NoInstanceError(f"no live instance serves model {request.model!r}")

    def _check_ttft(self, request: GenerateRequest, candidates: Sequence[Instance]) -> None:
        """Raise DeadlineUnreachable when every candidate whose speed is known is
        predicted to miss the request's deadline (or --max-predicted-ttft). Cached
        prefixes are not subtracted: the prediction errs towards admitting."""
        allowed = request.deadline - time.time()
        if self.config.max_predicted_ttft_s > 0:
            allowed = min(allowed, self.config.max_predicted_ttft_s)
        predictions = [self.ttft.predict(inst.instance_id, len(request.prompt_token_ids)) for inst in candidates]
        if not predictions or any(p is None or p <= allowed for p in predictions):
            return
        best = min(p for p in predictions if p is not None)
        raise DeadlineUnreachable(
            f"no instance is predicted to start this request within {max(allowed, 0):.1f} s (best: {best:.1f} s)",
            TTFTPredictor.retry_after_s(best, max(allowed, 0.0)),
        )

    def _release_pending(self, stream: RequestStream) -> None:
        """Its prompt no longer waits on its instance (a first delta came, or it closed)."""
        if stream.pending_prompt_tokens:
            self.ttft.remove_pending(stream.instance_id, stream.pending_prompt_tokens)
            stream.pending_prompt_tokens = 0

    def cancel(self, stream: RequestStream, reason: str = ErrorCode.CANCELLED) -> None:
        """Tell the instance to stop the request and free its KV, and forget the stream.

        Idempotent and synchronous (the publish runs as a task), so it is safe in
        `finally` blocks of cancelled coroutines.
        """
        self._send_cancel(stream, reason)
        self._close_quietly(stream)

    def fail(self, stream: RequestStream, error: ErrorInfo) -> None:
        """End the stream with `error` (its reader sees a final error delta) and cancel
        the request on its instance."""
        self._send_cancel(stream, error.code)
        stream._fail(error)

    def _send_cancel(self, stream: RequestStream, reason: str) -> None:
        if stream.remote_finished or stream.cancel_sent:
            return
        stream.cancel_sent = True
        self._publish_cancel(stream.instance_id, stream.request_id, reason)

    def _publish_cancel(
        self, instance_id: str, request_id: str, reason: str, role: str | None = None
    ) -> None:
        if role is None:
            inst = self.registry.get(instance_id)
            role = inst.heartbeat.role if inst is not None else subjects.InstanceRole.WORKER
        data = encode(CancelRequest(request_id=request_id, reason=reason))
        task = asyncio.get_running_loop().create_task(
            self._publish(subjects.cancel_subject(instance_id, role), data)
        )
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _publish(self, subject: str, data: bytes) -> None:
        try:
            await self._nc.publish(subject, data)
        except Exception as exc:
            log.warning("publish to %s failed: %s", subject, exc)

    def _open(self, request_id: str, inst: Instance) -> RequestStream:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id, inst.instance_id, self._on_stream_closed)
        self._streams[request_id] = stream
        inst.inflight += 1
        return stream

    def _close_quietly(self, stream: RequestStream) -> None:
        """Forget a stream without queueing anything more on it."""
        if not stream.finished:
            stream.finished = True
            self._on_stream_closed(stream)

    def _on_stream_closed(self, stream: RequestStream) -> None:
        self._release_pending(stream)
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
            inst = self.registry.get(stream.instance_id)
            if inst is not None:
                inst.inflight = max(0, inst.inflight - 1)

    async def _on_delta(self, msg: Msg) -> None:
        try:
            delta = decode(msg.data, TokenDelta)
        except ProtocolError as exc:
            log.warning("dropping bad TokenDelta: %s", exc)
            return
        stream = self._streams.get(delta.request_id)
        if stream is None:
            # A late delta of a cancelled or failed request. If it was failed because its
            # instance was dropped (which may have been a stall, not a death), the
            # instance still runs it for nobody: tell it to stop (once).
            orphan = self._orphans.pop(delta.request_id, None)
            if orphan is not None and not delta.finished:
                self._publish_cancel(orphan[0], delta.request_id, ErrorCode.WORKER_LOST, orphan[1])
            return
        self.registry.touch(stream.instance_id)
        self._release_pending(stream)
        if not stream._push(delta):
            self._send_cancel(stream, ErrorCode.LOST_DELTAS)

    # -- instances -------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except ProtocolError as exc:
            log.warning("dropping bad Heartbeat: %s", exc)
            return
        if not self.registry.accepts(hb.instance_id):
            return
        inst, new = self.registry.upsert(hb)
        self.ttft.observe(hb.instance_id, hb.load.prompt_tokens, hb.load.num_waiting, time.monotonic())
        if new:
            dropped_at = self.registry.silenced_at(hb.instance_id)
            if dropped_at is not None:
                log.warning(
                    "instance %s is back (dropped for silence %.1f s ago); re-admitted",
                    hb.instance_id,
                    self.watch.clock() - dropped_at,
                )
            else:
                log.info("instance %s joined (%s, %s)", hb.instance_id, hb.role, hb.model)
        if hb.kv_event_seq > self.index.last_seq(hb.instance_id) or self.index.needs_resync(hb.instance_id):
            # Its events went ahead of what we saw (we joined late or lost some), or a
            # snapshot asked for earlier never came whole: ask (again).
            self._maybe_resync(hb.instance_id)

    async def _on_kv_events(self, msg: Msg) -> None:
        try:
            part = decode(msg.data, KVEvents)
            events = self._event_parts.add(part)
        except ProtocolError as exc:
            log.warning("dropping bad KVEvents: %s", exc)
            return
        if events is None:  # more parts of its batch to come
            return
        if not subjects.is_kvstore_events_id(events.instance_id) and not self.registry.accepts(
            events.instance_id
        ):
            return
        if not self.index.apply(events.instance_id, events.batch):
            self._maybe_resync(events.instance_id)

    def _maybe_resync(self, instance_id: str) -> None:
        now = time.monotonic()
        if now < self._resync_at.get(instance_id, 0.0):
            return
        self._resync_at[instance_id] = now + self.config.resync_interval_s
        task = asyncio.get_running_loop().create_task(self._resync(instance_id))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _resync(self, instance_id: str) -> None:
        """Replace our view of an instance's prefix cache with its snapshot, which may
        come as several replies (protocol/parts.py): one inbox collects them."""
        parts = SnapshotParts()
        whole: asyncio.Future[KVSnapshot] = asyncio.get_running_loop().create_future()

        async def on_part(msg: Msg) -> None:
            try:
                snap = parts.add(decode(msg.data, KVSnapshot))
            except ProtocolError as exc:
                if not whole.done():
                    whole.set_exception(exc)
                return
            if snap is not None and not whole.done():
                whole.set_result(snap)

        inbox = self._nc.new_inbox()
        sub = None
        try:
            sub = await self._nc.subscribe(inbox, cb=on_part)
            request = encode(KVSnapshotRequest(gateway_id=self.config.gateway_id))
            await self._nc.publish(subjects.kv_snapshot_subject(instance_id), request, reply=inbox)
            snap = await asyncio.wait_for(whole, self.config.snapshot_timeout_s)
        except TimeoutError:
            # Gone, busy, or a part lost: our view stays marked stale, and the next gap
            # or heartbeat asks again (at most every resync_interval_s). A lost part is
            # worth a warning; silence was always possible (an instance on its way out).
            level = logging.WARNING if parts.started else logging.DEBUG
            log.log(level, "KV snapshot of %s incomplete after %.0f s (%s); asking again later", instance_id, self.config.snapshot_timeout_s, parts.describe())
            return
        except Exception as exc:
            log.warning("KV snapshot of %s failed: %s", instance_id, exc)
            return
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        if self.registry.get(instance_id) is not None or subjects.is_kvstore_events_id(instance_id):
            self.index.replace(instance_id, snap.block_keys, snap.seq, host_keys=snap.host_block_keys)

    async def _on_leave(self, msg: Msg) -> None:
        try:
            leave = decode(msg.data, Leave)
        except ProtocolError:
            return
        inst = self.registry.remove(leave.instance_id)
        if inst is not None:
            self._lost(
                inst,
                ErrorInfo(
                    ErrorCode.WORKER_SHUTDOWN, f"instance {inst.instance_id} shut down ({leave.reason})"
                ),
            )

    def _lost(self, inst: Instance, error: ErrorInfo) -> None:
        log.warning("instance %s dropped: %s", inst.instance_id, error.message)
        self.index.drop(inst.instance_id)
        self.ttft.forget(inst.instance_id)
        self._event_parts.drop(inst.instance_id)
        self._resync_at.pop(inst.instance_id, None)
        for stream in [s for s in self._streams.values() if s.instance_id == inst.instance_id]:
            # Failed for good, even if the instance comes back. If it is alive after all,
            # the cancel frees the request's KV there; if the cancel is lost too, the
            # instance's next delta of it triggers another (_on_delta).
            if not stream.remote_finished and not stream.cancel_sent:
                stream.cancel_sent = True
                self._publish_cancel(inst.instance_id, stream.request_id, error.code, inst.heartbeat.role)
            stream._fail(error)
            self._orphans[stream.request_id] = (inst.instance_id, inst.heartbeat.role)
            if len(self._orphans) > self.MAX_ORPHANS:
                self._orphans.popitem(last=False)
        if self.on_instance_lost is not None:
            self.on_instance_lost(inst, error.code)

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_check_interval_s)
            now = self.watch.clock()
            for inst in self.registry.expire():
                silent = now - inst.last_seen
                message = f"instance {inst.instance_id} stopped responding ({silent:.1f} s without a heartbeat; lease {inst.lease_s:.1f} s)"
                self._lost(inst, ErrorInfo(ErrorCode.WORKER_LOST, message))

    async def _status_loop(self) -> None:
        """Streams that went quiet are checked with their instance. Deltas lost in transit
        (a NATS restart drops what was published before the gateway re-subscribed) are
        noticed by the gap they leave, unless the lost one was the last: then nothing
        follows, the instance has finished, and only asking tells. A request the instance
        no longer runs in two checks in a row (a final delta still on its way arrives
        between them) fails with `lost_deltas` instead of hanging."""
        while True:
            await asyncio.sleep(self.config.stream_quiet_s)
            quiet_before = time.monotonic() - self.config.stream_quiet_s
            by_instance: dict[str, list[RequestStream]] = {}
            for stream in self._streams.values():
                if not stream.finished and stream.last_delta < quiet_before:
                    by_instance.setdefault(stream.instance_id, []).append(stream)
            if by_instance:
                await asyncio.gather(*(self._check_streams(iid, streams) for iid, streams in by_instance.items()))

    async def _check_streams(self, instance_id: str, streams: list[RequestStream]) -> None:
        inst = self.registry.get(instance_id)
        if inst is None:
            return  # not (or no longer) registered: its lease decides
        query = StatusQuery(gateway_id=self.config.gateway_id, request_ids=[s.request_id for s in streams])
        try:
            msg = await self._nc.request(
                subjects.status_subject(instance_id, inst.heartbeat.role), encode(query), timeout=self.config.status_timeout_s
            )
            running = set(decode(msg.data, StatusReply).running)
        except Exception as exc:  # noqa: BLE001 - unreachable now: its lease decides
            log.debug("status of %d stream(s) on %s: %r", len(streams), instance_id, exc)
            return
        for stream in streams:
            if stream.finished or stream.request_id in running:
                stream.unknown_to_instance = 0
                continue
            stream.unknown_to_instance += 1
            if stream.unknown_to_instance >= 2:
                log.warning("request %s: %s no longer runs it and its end never arrived", stream.request_id, instance_id)
                stream.remote_finished = True  # nothing to cancel there
                stream._fail(
                    ErrorInfo(ErrorCode.LOST_DELTAS, f"the end of the request was lost in transit from {instance_id} (a NATS outage?)")
                )

    def _gateway_heartbeat(self) -> bytes:
        """Our heartbeat (built on the heartbeat thread: config only)."""
        return encode(GatewayHeartbeat(gateway_id=self.config.gateway_id, lease_s=self.config.lease_s))
