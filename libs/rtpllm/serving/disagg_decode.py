"""The decode side of disaggregation: decide per request where the prompt is prefilled,
and run the hand-off with a prefill instance when it is remote.

Per request (ARCHITECTURE rule 4): n == 1, no prompt logprobs, a prefill instance
alive and at least `local_prefill_below` prompt tokens missing from this engine's
prefix cache -> the engine reserves the prompt's blocks and a prefill instance fills
the ones it lacks over the data plane; otherwise the prompt is prefilled here.

A remote attempt fails when the prefill instance refuses, reports an error, leaves or
stops heartbeating, or the transfer breaks, is refused or outlives its lease. Then the
next prefill instance is tried, unless the first token is already out (the client may
have it: it must not change), in which case, or when none is left, the prompt is
prefilled here into the same blocks. Either way the request goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from rtpllm.engine.async_engine import RemotePrefill
from rtpllm.outputs import KVReservation
from rtpllm.protocol import subjects
from rtpllm.protocol.messages import (
    CancelRequest,
    DataPlaneEndpoint,
    DisaggCounters,
    Discover,
    GenerateRequest,
    Handoff,
    Heartbeat,
    Leave,
    PrefillResult,
    ProtocolError,
    SubmitReply,
    TransferCounters,
    decode,
    encode,
)
from rtpllm.protocol.subjects import InstanceRole
from rtpllm.routing.instances import Instance, InstanceRegistry
from rtpllm.sampling_params import SamplingParams
from rtpllm.transfer import KVReceiver, TransferError

log = logging.getLogger(__name__)


def choose_prefill(candidates: list[Instance], turn: int) -> Instance:
    """The least loaded prefill instance. Load counts this decode instance's own hand-offs
    in flight (`inflight`: exact and current) or the heartbeat's, whichever is larger; ties
    rotate with `turn`, so idle instances share the work instead of the lowest id taking
    every request between heartbeats (each decode instance would pick the same one)."""
    ordered = sorted(candidates, key=lambda i: i.instance_id)
    start = turn % len(ordered)
    return min(ordered[start:] + ordered[:start], key=lambda i: i.pending)


@dataclass(frozen=True)
class DecodeConfig:
    local_prefill_below: int = 512  # uncached prompt tokens below which we prefill here
    transfer_lease_s: float = 30.0  # a remote prefill + transfer must finish within this
    submit_timeout_s: float = 5.0  # a prefill instance accepts a hand-off within this (as gateways wait for workers)
    max_attempts: int = 2  # prefill instances tried before prefilling here


class _AttemptFailed(Exception):
    pass


@dataclass
class _Outcome:
    ok: bool
    result: PrefillResult | None = None  # the first token, if the prefill instance sent it


class DecodeSide:
    """Hand-off orchestration of one decode instance (used by its EngineServer)."""

    def __init__(
        self, nc: NATS, engine: Any, instance_id: str, model: str, receiver: KVReceiver, config: DecodeConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._nc = nc
        self._engine = engine
        self._instance_id = instance_id
        self._model = model
        self._receiver = receiver
        self.config = config
        # No tombstones: a prefill instance whose heartbeats were late (a loaded host) comes
        # back with its next one instead of being shunned for good. `clock`: the engine
        # server's, which stands still while this process's loop is stalled (no prefill
        # instance is dropped for heartbeats this process could not read).
        self._prefills = InstanceRegistry(clock, tombstones=0)
        self._turns = itertools.count()  # rotates ties among equally loaded prefill instances
        self._results: dict[str, asyncio.Future[PrefillResult]] = {}
        self._subs: list[Subscription] = []
        self._expire_task: asyncio.Task[None] | None = None
        self._counters = DisaggCounters()
        # Prefill instances whose KV namespace (model, dtype, KV cache format, TP, block
        # size) is not ours: never asked to prefill, reported once each.
        self._foreign: set[str] = set()

    def counters(self) -> DisaggCounters:
        return self._counters

    async def start(self) -> None:
        self._subs = [
            await self._nc.subscribe(subjects.prefilled_subject(self._instance_id), cb=self._on_prefilled),
            await self._nc.subscribe(subjects.HEARTBEAT, cb=self._on_heartbeat),
            await self._nc.subscribe(subjects.LEAVE, cb=self._on_leave),
        ]
        # Prefill instances answer at once instead of at their next heartbeat.
        await self._nc.publish(subjects.DISCOVER, encode(Discover(gateway_id=self._instance_id)))
        self._expire_task = asyncio.create_task(self._expire_loop(), name="prefill-leases")

    async def close(self) -> None:
        if self._expire_task is not None:
            self._expire_task.cancel()
        with contextlib.suppress(Exception):
            for sub in self._subs:
                await sub.unsubscribe()

    # -- the decision ----------------------------------------------------------------

    def prefill_instances(self) -> list[Instance]:
        return self._prefills.candidates(self._model, (InstanceRole.PREFILL,))

    def plan(self, prompt_len: int, params: SamplingParams) -> RemotePrefill | None:
        """A RemotePrefill for the engine if this request may be prefilled remotely
        (the engine then checks its uncached part against the threshold), else None."""
        threshold = max(self.config.local_prefill_below, 1)
        if params.n != 1 or params.prompt_logprobs is not None or prompt_len < threshold or not self.prefill_instances():
            self._counters.local_prefills += 1
            return None
        return RemotePrefill(min_uncached_tokens=threshold, reserved=asyncio.get_running_loop().create_future())

    # -- the hand-off ----------------------------------------------------------------

    async def run(self, req: GenerateRequest, remote: RemotePrefill) -> None:
        """Get the reserved blocks filled remotely, or fall back to a local prefill."""
        try:
            await self._run(req, remote)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # really cancelled (the request ended): nothing to fall back for
            # A CancelledError from inside (a cancelled future read) is a bug, not a stop:
            # the request must not wait for KV forever.
            log.exception("request %s: hand-off failed unexpectedly; prefilling here", req.request_id)
            self._engine.fail_remote_prefill(req.request_id)
        except Exception:  # a bug here must not leave the request waiting for KV forever
            log.exception("request %s: hand-off failed unexpectedly; prefilling here", req.request_id)
            self._engine.fail_remote_prefill(req.request_id)

    async def _run(self, req: GenerateRequest, remote: RemotePrefill) -> None:
        reservation = await remote.reserved
        if reservation is None:
            self._counters.local_prefills += 1
            return
        rid = req.request_id
        tried: set[str] = set()
        known: PrefillResult | None = None
        for attempt in range(self.config.max_attempts):
            candidates = [i for i in self.prefill_instances() if i.instance_id not in tried]
            if not candidates:
                break
            inst = choose_prefill(candidates, next(self._turns))
            tried.add(inst.instance_id)
            inst.inflight += 1
            try:
                outcome = await self._attempt(req, reservation, inst, attempt)
            finally:
                inst.inflight -= 1
            if outcome.ok:
                assert outcome.result is not None
                r = outcome.result
                if r.finished:  # the first token ended it: no KV came, nothing to commit
                    self._engine.fail_remote_prefill(rid, r.token_id, r.logprobs)
                else:
                    self._engine.complete_remote_prefill(rid, r.token_id, r.logprobs, r.num_cached_tokens)
                self._counters.remote_prefills += 1
                return
            if outcome.result is not None:
                known = outcome.result
                break
        if tried:
            self._counters.remote_fallbacks += 1
            log.warning("request %s: remote prefill failed on %s; prefilling here", rid, ", ".join(sorted(tried)))
        else:
            self._counters.local_prefills += 1
        if known is not None:
            self._engine.fail_remote_prefill(rid, known.token_id, known.logprobs)
        else:
            self._engine.fail_remote_prefill(rid)

    async def _attempt(self, req: GenerateRequest, reservation: KVReservation, inst: Instance, attempt: int) -> _Outcome:
        rid = req.request_id
        transfer_id = f"{rid}.{attempt}.{uuid.uuid4().hex[:8]}"
        lease_s = self.config.transfer_lease_s
        incoming = self._receiver.expect(transfer_id, reservation.block_ids, lease_s)
        result_future: asyncio.Future[PrefillResult] = asyncio.get_running_loop().create_future()
        self._results[transfer_id] = result_future
        endpoint = self._receiver.endpoint
        handoff = Handoff(
            decode_instance_id=self._instance_id,
            transfer_id=transfer_id,
            endpoint=DataPlaneEndpoint(**msgspec.structs.asdict(endpoint)),
            skip_blocks=reservation.skip_blocks,
            num_blocks=len(reservation.block_ids),
            lease_s=lease_s,
            transfer_token=incoming.token,
        )
        message = GenerateRequest(
            request_id=rid, model=req.model, prompt_token_ids=req.prompt_token_ids, sampling=req.sampling,
            reply_to=req.reply_to, gateway_id=req.gateway_id, deadline=req.deadline, handoff=handoff,
            images=req.images,  # the prefill instance gets the embeddings its own way
        )  # fmt: skip
        deadline = time.monotonic() + lease_s
        accepted = False
        try:
            try:
                msg = await self._nc.request(
                    subjects.generate_subject(inst.instance_id, InstanceRole.PREFILL), encode(message, self._nc.max_payload), timeout=self.config.submit_timeout_s
                )
                reply = decode(msg.data, SubmitReply)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, ProtocolError) as exc:
                raise _AttemptFailed(f"{inst.instance_id} did not take the hand-off: {exc!r}") from exc
            if not reply.accepted:
                raise _AttemptFailed(f"{inst.instance_id} refused the hand-off: {reply.error}")
            accepted = True
            result = await self._watch(result_future, inst.instance_id, deadline)
            if result.error is not None:
                raise _AttemptFailed(f"{inst.instance_id}: {result.error.message}")
            if result.finished:
                incoming.cancel()
                return _Outcome(True, result)
            stats = await self._watch(incoming.wait(), inst.instance_id, deadline)
            self._count(stats.backend, stats.nbytes, stats.seconds)
            return _Outcome(True, result)
        except (_AttemptFailed, TransferError) as exc:
            log.warning("request %s: hand-off attempt %d failed: %s", rid, attempt, exc)
            incoming.cancel()
            self._counters.transfers.setdefault(getattr(incoming, "backend", None) or "unknown", TransferCounters()).failures += 1
            if accepted:
                await self._cancel_on(inst.instance_id, rid)
            # _watch cancels what it waited on when the attempt fails there: a cancelled
            # result future has no result, and asking for one raised CancelledError, which
            # ended the hand-off task without a fallback (the request then waited for KV
            # forever; found by bench/chaos.py killing prefill instances mid-hand-off).
            answered = result_future.done() and not result_future.cancelled()
            known = result_future.result() if answered and result_future.result().error is None else None
            return _Outcome(False, known)
        except asyncio.CancelledError:
            incoming.cancel()
            if accepted:
                await asyncio.shield(self._cancel_on(inst.instance_id, rid))
            raise
        finally:
            self._results.pop(transfer_id, None)

    async def _watch(self, awaitable: Any, prefill_id: str, deadline: float) -> Any:
        """Await `awaitable` while the prefill instance stays alive and the lease lasts."""
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _AttemptFailed(f"the hand-off outlived its {self.config.transfer_lease_s:.0f} s lease")
                done, _ = await asyncio.wait({task}, timeout=min(0.1, remaining))
                if done:
                    return task.result()
                if self._prefills.get(prefill_id) is None:
                    raise _AttemptFailed(f"prefill instance {prefill_id} is gone")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _cancel_on(self, prefill_id: str, request_id: str) -> None:
        with contextlib.suppress(Exception):
            await self._nc.publish(
                subjects.cancel_subject(prefill_id, InstanceRole.PREFILL), encode(CancelRequest(request_id=request_id, reason="handoff_failed"))
            )

    def _count(self, backend: str, nbytes: int, seconds: float) -> None:
        c = self._counters.transfers.setdefault(backend, TransferCounters())
        c.transfers += 1
        c.bytes += nbytes
        c.seconds += seconds

    # -- bus -------------------------------------------------------------------------

    async def _on_prefilled(self, msg: Msg) -> None:
        try:
            result = decode(msg.data, PrefillResult)
        except ProtocolError as exc:
            log.warning("dropping bad PrefillResult: %s", exc)
            return
        self._prefills.touch(result.prefill_instance_id)
        future = self._results.get(result.transfer_id)
        if future is not None and not future.done():
            future.set_result(result)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except ProtocolError:
            return
        if hb.role == InstanceRole.PREFILL.value and self._prefills.accepts(hb.instance_id):
            if hb.kv_namespace and hb.kv_namespace != self._receiver.layout.namespace:
                # Its blocks mean other bytes (e.g. another --kv-cache-dtype): refuse its KV.
                if hb.instance_id not in self._foreign:
                    self._foreign.add(hb.instance_id)
                    log.error(
                        "prefill instance %s is not used: its KV namespace differs from this decode "
                        "instance's (model, dtype, KV cache format --kv-cache-dtype/--kv-cache-plan, "
                        "TP size or block size); start both with the same KV settings",
                        hb.instance_id,
                    )
                return
            self._prefills.upsert(hb)

    async def _on_leave(self, msg: Msg) -> None:
        with contextlib.suppress(ProtocolError):
            self._prefills.remove(decode(msg.data, Leave).instance_id)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            for inst in self._prefills.expire():
                log.warning("prefill instance %s stopped heartbeating", inst.instance_id)
