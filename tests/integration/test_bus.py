"""The NATS protocol between dispatcher (gateway side) and engine server (worker side),
in-process over a real nats-server, with the zero-compute engine: ordering, usage,
cancel, rejection, lease expiry, goodbye, lost deltas, garbage on the wire, a blocked
event loop, re-admission after silence, full instances."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import nats
import pytest

from rtpllm.protocol import subjects
from rtpllm.protocol.convert import spec_from_params
from rtpllm.protocol.messages import (
    CancelRequest,
    ErrorCode,
    GenerateRequest,
    SamplingSpec,
    SubmitReply,
    TokenDelta,
    decode,
    encode,
)
from rtpllm.routing.policy import LeastLoaded
from rtpllm.runtime.processes import ManagedProcess, start_nats
from rtpllm.sampling_params import SamplingParams
from rtpllm.serving.dispatcher import (
    Dispatcher,
    DispatcherConfig,
    InstancesBusy,
    NoInstanceError,
    SubmitRejected,
)
from rtpllm.serving.engine_info import EngineInfo
from rtpllm.serving.engine_server import EngineServer, EngineServerConfig
from rtpllm.serving.liveness import HeartbeatThread
from rtpllm.serving.synthetic_engine import SyntheticEngine

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    proc: ManagedProcess
    proc, url = start_nats()
    yield url
    proc.stop(5)


class Bus:
    """One gateway-side dispatcher and engine servers, each on its own connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.servers: list[EngineServer] = []
        self.engines: list[SyntheticEngine] = []
        self.conns: list[nats.NATS] = []
        self.dispatcher: Dispatcher | None = None

    async def server(
        self,
        step_s: float = 0.0,
        lease_s: float = 1.0,
        instance_id: str | None = None,
        max_waiting_seqs: int | None = None,
        info: EngineInfo | None = None,
    ) -> EngineServer:
        nc = await nats.connect(self.url)
        self.conns.append(nc)
        engine = SyntheticEngine(step_s, info)
        config = EngineServerConfig(
            instance_id=instance_id or f"w{len(self.servers)}",
            heartbeat_interval_s=0.1,
            lease_s=lease_s,
            max_waiting_seqs=max_waiting_seqs,
        )
        server = EngineServer(nc, engine, engine.info, config)
        await server.start()
        self.servers.append(server)
        self.engines.append(engine)
        return server

    async def gateway(self) -> Dispatcher:
        nc = await nats.connect(self.url)
        self.conns.append(nc)
        self.dispatcher = Dispatcher(
            nc,
            LeastLoaded(),
            DispatcherConfig(
                gateway_id="gw",
                submit_timeout_s=1.0,
                heartbeat_interval_s=0.1,
                lease_s=1.0,
                lease_check_interval_s=0.05,
            ),
        )
        await self.dispatcher.start()
        return self.dispatcher

    async def wait_instances(self, n: int) -> None:
        assert self.dispatcher is not None
        for _ in range(200):
            if len(self.dispatcher.candidates("synthetic")) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("instances never registered")

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


def request(rid: str, max_tokens: int = 8, **params: object) -> GenerateRequest:
    spec = spec_from_params(SamplingParams(max_tokens=max_tokens, **params))  # type: ignore[arg-type]
    return GenerateRequest(
        request_id=rid,
        model="synthetic",
        prompt_token_ids=[1, 2, 3],
        sampling=spec,
        reply_to="",
        gateway_id="",
        deadline=time.time() + 30,
    )


async def collect(stream) -> list[TokenDelta]:  # type: ignore[no-untyped-def]
    return [d async for d in stream]


async def test_stream_in_order_with_usage(bus: Bus) -> None:
    await bus.server()
    d = await bus.gateway()
    await bus.wait_instances(1)
    deltas = await asyncio.wait_for(collect(await d.submit(request("r1", max_tokens=8, n=2))), 10)
    assert [x.seq for x in deltas] == list(range(len(deltas)))
    assert deltas[-1].finished and deltas[-1].error is None
    assert (
        deltas[-1].usage is not None
        and deltas[-1].usage.completion_tokens == 16
        and deltas[-1].usage.prompt_tokens == 3
    )
    assert "".join(c.text for x in deltas for c in x.choices if c.index == 0) == "abcdefgh"
    assert d.num_streams == 0 and d.registry.get("w0").inflight == 0  # type: ignore[union-attr]


async def test_bad_request_rejected_model_mismatch_skipped(bus: Bus) -> None:
    await bus.server()
    d = await bus.gateway()
    await bus.wait_instances(1)
    bad = request("r2")
    bad.sampling = SamplingSpec(temperature=-1.0)
    with pytest.raises(SubmitRejected) as info:
        await d.submit(bad)
    assert info.value.error.code == ErrorCode.INVALID_REQUEST
    assert "temperature" in info.value.error.message
    too_long = request("r3")
    too_long.prompt_token_ids = []
    with pytest.raises(SubmitRejected):
        await d.submit(too_long)
    other = request("r4")
    other.model = "not-served"
    with pytest.raises(NoInstanceError):
        await d.submit(other)
    # Still serving after all that.
    assert (await collect(await d.submit(request("r5"))))[-1].usage is not None


async def test_cancel_stops_the_engine_request(bus: Bus) -> None:
    await bus.server(step_s=0.01)
    d = await bus.gateway()
    await bus.wait_instances(1)
    stream = await d.submit(request("r6", max_tokens=10_000))
    it = aiter(stream)
    await anext(it)
    assert bus.engines[0].stats().num_running == 1
    d.cancel(stream)
    for _ in range(100):
        if bus.engines[0].stats().num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert bus.engines[0].stats().num_running == 0
    assert bus.servers[0].num_running == 0


async def test_silent_instance_fails_its_streams_after_its_lease(bus: Bus) -> None:
    server = await bus.server(step_s=0.01, lease_s=0.5)
    d = await bus.gateway()
    await bus.wait_instances(1)
    stream = await d.submit(request("r7", max_tokens=10_000))
    it = aiter(stream)
    await anext(it)
    # Simulate a hung/partitioned worker: it stops heartbeating and streaming, says nothing.
    await server._beats.stop()
    for task in server._tasks:
        task.cancel()
    for item in list(server._running.values()):
        item.task.cancel()
    t0 = time.monotonic()
    last = None
    async for delta in it:
        last = delta
    elapsed = time.monotonic() - t0
    assert last is not None and last.error is not None and last.error.code == ErrorCode.WORKER_LOST
    assert elapsed < 0.5 + 0.3
    assert d.registry.get(server.instance_id) is None
    with pytest.raises(NoInstanceError):
        await d.submit(request("r8"))


async def test_drain_finishes_or_fails_streams_and_says_goodbye(bus: Bus) -> None:
    server = await bus.server(step_s=0.01)
    d = await bus.gateway()
    await bus.wait_instances(1)
    short = await d.submit(request("short", max_tokens=5))
    long = await d.submit(request("long", max_tokens=10_000))
    drain = asyncio.create_task(server.drain(0.3))
    short_deltas = await asyncio.wait_for(collect(short), 5)
    long_deltas = await asyncio.wait_for(collect(long), 5)
    await drain
    assert short_deltas[-1].error is None and short_deltas[-1].usage is not None
    assert long_deltas[-1].error is not None and long_deltas[-1].error.code == ErrorCode.WORKER_SHUTDOWN
    for _ in range(100):
        if d.registry.get(server.instance_id) is None:
            break
        await asyncio.sleep(0.01)
    assert d.registry.get(server.instance_id) is None  # the Leave dropped it at once


async def test_gap_in_deltas_fails_the_stream(bus: Bus) -> None:
    await bus.server(step_s=0.05)
    d = await bus.gateway()
    await bus.wait_instances(1)
    stream = await d.submit(request("r9", max_tokens=10_000))
    it = aiter(stream)
    await anext(it)
    # A delta from far ahead, as if the ones between were dropped.
    await bus.conns[-1].publish(d.reply_subject, encode(TokenDelta(request_id="r9", seq=1000)))
    last = None
    async for delta in it:
        last = delta
    assert last is not None and last.error is not None and last.error.code == ErrorCode.LOST_DELTAS
    for _ in range(100):  # the instance was told to stop
        if bus.engines[0].stats().num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert bus.engines[0].stats().num_running == 0


async def test_garbage_on_the_wire_is_refused_not_fatal(bus: Bus) -> None:
    server = await bus.server()
    d = await bus.gateway()
    await bus.wait_instances(1)
    nc = bus.conns[-1]
    msg = await nc.request(subjects.generate_subject(server.instance_id), b"\x00not msgpack", timeout=2)
    reply = decode(msg.data, SubmitReply)
    assert not reply.accepted and reply.error is not None and reply.error.code == ErrorCode.INVALID_REQUEST
    for subject in (
        subjects.HEARTBEAT,
        subjects.LEAVE,
        d.reply_subject,
        subjects.cancel_subject(server.instance_id),
    ):
        await nc.publish(subject, b"garbage")
    await nc.flush()
    assert (await collect(await d.submit(request("r10"))))[-1].usage is not None


async def test_blocked_event_loop_loses_no_instance_and_no_request(bus: Bus) -> None:
    """Gateway and instance share this loop: blocked for 4 leases, neither drops the
    other (their heartbeat threads kept beating; their lease clocks stood still)."""
    server = await bus.server(step_s=0.01, lease_s=0.5)
    d = await bus.gateway()
    await bus.wait_instances(1)
    stream = await d.submit(request("blocked", max_tokens=50))
    it = aiter(stream)
    await anext(it)
    sent = (server._beats.sent, d._beats.sent)
    time.sleep(2.0)  # blocks the loop, as parsing a huge body would
    assert server._beats.sent - sent[0] >= 10 and d._beats.sent - sent[1] >= 10, (
        "heartbeats went out meanwhile"
    )
    rest = await asyncio.wait_for(collect(it), 10)
    assert rest[-1].error is None and rest[-1].usage is not None, rest[-1].error
    assert d.registry.get(server.instance_id) is not None
    assert d.watch.max_lag_s >= 1.9 and server.watch.max_lag_s >= 1.9


async def test_instance_dropped_for_silence_is_readmitted_and_its_requests_reconciled(bus: Bus) -> None:
    server = await bus.server(step_s=30, lease_s=0.5)  # its request emits nothing for 30 s
    d = await bus.gateway()
    await bus.wait_instances(1)
    stream = await d.submit(request("orphan", max_tokens=5))
    assert bus.engines[0].stats().num_running == 1
    await server._beats.stop()  # silent, yet alive (a stalled host, a partition)
    t0 = time.monotonic()
    deltas = await asyncio.wait_for(collect(stream), 5)
    assert deltas[-1].error is not None and deltas[-1].error.code == ErrorCode.WORKER_LOST
    assert time.monotonic() - t0 < 0.5 + 0.4
    assert d.registry.get(server.instance_id) is None
    # The gateway failed it for good and told the instance: its KV is freed there.
    for _ in range(100):
        if bus.engines[0].stats().num_running == 0:
            break
        await asyncio.sleep(0.02)
    assert bus.engines[0].stats().num_running == 0 and server.num_running == 0
    # Heartbeats resume: re-admitted with the first one.
    nc = bus.conns[0]
    beats = HeartbeatThread(
        nc, subjects.HEARTBEAT, lambda: encode(server.heartbeat_message()), 0.1, "resumed"
    )
    t0 = time.monotonic()
    await beats.start()
    try:
        for _ in range(100):
            if d.registry.get(server.instance_id) is not None:
                break
            await asyncio.sleep(0.01)
        assert d.registry.get(server.instance_id) is not None and time.monotonic() - t0 < 0.5
        # A late delta of the failed request: the instance is told (again) to stop it.
        probe = await nats.connect(bus.url)
        bus.conns.append(probe)
        cancels: asyncio.Queue[CancelRequest] = asyncio.Queue()

        async def on_cancel(msg: nats.aio.msg.Msg) -> None:
            cancels.put_nowait(decode(msg.data, CancelRequest))

        await probe.subscribe(subjects.cancel_subject(server.instance_id), cb=on_cancel)
        await probe.flush()
        await probe.publish(d.reply_subject, encode(TokenDelta(request_id="orphan", seq=1)))
        cancel = await asyncio.wait_for(cancels.get(), 2)
        assert cancel.request_id == "orphan" and cancel.reason == ErrorCode.WORKER_LOST
        # ... and it takes requests again.
        again = await d.submit(request("after"))
        assert again.instance_id == server.instance_id
        d.cancel(again)
    finally:
        await beats.stop()


async def test_full_instance_refuses_and_the_gateway_reports_busy(bus: Bus) -> None:
    info = EngineInfo(
        model="synthetic",
        max_model_len=1024,
        vocab_size=1024,
        max_num_seqs=2,
        block_size=16,
        kv_namespace=b"",
    )
    server = await bus.server(step_s=0.05, max_waiting_seqs=1, info=info)  # at most 2 + 1 sequences
    d = await bus.gateway()
    await bus.wait_instances(1)
    assert server.max_seqs == 3
    first = await d.submit(request("two", max_tokens=10_000, n=2))
    second = await d.submit(request("one", max_tokens=10_000))
    with pytest.raises(InstancesBusy):
        await d.submit(request("more"))
    d.cancel(first)
    d.cancel(second)
    for _ in range(100):
        if server.num_running == 0:
            break
        await asyncio.sleep(0.02)
    assert (await asyncio.wait_for(collect(await d.submit(request("later", n=3))), 5))[-1].error is None


async def test_a_stream_whose_end_was_lost_fails_and_a_quiet_running_one_does_not(bus: Bus) -> None:
    """After a NATS restart the last delta of a request may be gone with nothing after it
    to reveal a gap. The gateway asks the instance about quiet streams: one it no longer
    runs fails with lost_deltas; one it still runs (slowly) is left alone."""
    await bus.server(step_s=0.6)  # a token every 0.6 s: quiet longer than stream_quiet_s
    nc = await nats.connect(bus.url)
    bus.conns.append(nc)
    d = bus.dispatcher = Dispatcher(
        nc, LeastLoaded(),
        DispatcherConfig(gateway_id="gw-status", heartbeat_interval_s=0.1, lease_s=1.0, stream_quiet_s=0.25),
    )  # fmt: skip
    await d.start()
    await bus.wait_instances(1)
    slow = await d.submit(request("slow", max_tokens=3))
    # A stream the instance does not run: as if it had finished and its end was lost.
    inst = d.candidates("synthetic")[0]
    ghost = d._open("ghost", inst)
    start = time.monotonic()
    ghost_deltas = await asyncio.wait_for(collect(ghost), 5)
    assert ghost_deltas[-1].error is not None and ghost_deltas[-1].error.code == ErrorCode.LOST_DELTAS
    assert time.monotonic() - start < 2.0
    slow_deltas = await asyncio.wait_for(collect(slow), 10)
    assert slow_deltas[-1].error is None and slow_deltas[-1].finished


async def test_a_request_predicted_to_miss_its_deadline_is_refused_early(bus: Bus) -> None:
    """Rule 3: no instance predicted to start it in time -> 429-style refusal with a
    Retry-After, before anything is queued; an instance with unknown speed admits."""
    from rtpllm.serving.dispatcher import DeadlineUnreachable

    await bus.server()
    nc = await nats.connect(bus.url)
    bus.conns.append(nc)
    d = bus.dispatcher = Dispatcher(
        nc, LeastLoaded(), DispatcherConfig(gateway_id="gw-ttft", heartbeat_interval_s=0.1, max_predicted_ttft_s=1.0)
    )
    await d.start()
    await bus.wait_instances(1)
    iid = d.candidates("synthetic")[0].instance_id
    ok = await d.submit(request("unknown-speed"))  # nothing learned yet: admitted
    await collect(ok)
    # Seen busy: 100 prompt tokens/s; 400 of ours are still waiting for a first token.
    d.ttft.add_pending(iid, 400)
    # (Ahead of the clock: the instance's own heartbeats, earlier, cannot interleave.)
    later = time.monotonic() + 10
    d.ttft.observe(iid, 0, waiting=1, now=later)
    d.ttft.observe(iid, 100, waiting=1, now=later + 1)
    big = request("too-slow")
    big.prompt_token_ids = list(range(200))
    with pytest.raises(DeadlineUnreachable) as refused:
        await d.submit(big)
    assert refused.value.retry_after_s == 5  # (400 + 200) / 100 = 6 s predicted, 1 s allowed
    assert bus.engines[0].stats().num_running == 0  # nothing was sent
    d.ttft.remove_pending(iid, 400)
    small = request("fits")
    small.prompt_token_ids = list(range(50))  # 0.5 s predicted
    assert (await collect(await d.submit(small)))[-1].error is None


async def test_pending_prompt_tokens_are_released_on_first_delta_and_on_cancel(bus: Bus) -> None:
    """The TTFT prediction counts a request's prompt only until its first delta or its
    close: a stream cancelled before any delta must not inflate it for good."""
    await bus.server(step_s=0.5)
    d = await bus.gateway()
    await bus.wait_instances(1)
    cancelled = await d.submit(request("gone", max_tokens=50))
    d.cancel(cancelled)
    assert d.ttft._pending == {}
    done = await d.submit(request("done", max_tokens=2))
    assert d.ttft._pending  # waiting for its first token
    await collect(done)
    assert d.ttft._pending == {}
