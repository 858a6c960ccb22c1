"""The KV data plane (rtpllm.transfer) on CPU pools over real loopback sockets.

Every transfer is checked bit for bit (pools hold random bit patterns, NaNs included,
compared as integers) and so is the rest of the receiver's pool: a transfer may write its
target blocks and nothing else. Failure paths: missing, wrong and replayed one-time
tokens, layout refusal, unknown ids, leases,
corrupted payloads, dropped connections, cancel/abort, duplicate frames, a receiver that
never acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest
import torch

from rtpllm.transfer import (
    ChecksumMismatch,
    KVEndpoint,
    KVLayout,
    KVReceiver,
    KVSender,
    TransferAborted,
    TransferError,
    TransferRefused,
    TransferTimeout,
    faults,
)
from rtpllm.transfer.checksum import WeightedSum
from rtpllm.transfer.endpoint import SHM_DIR, shm_available
from rtpllm.transfer.framing import PROTOCOL_VERSION, Error, FrameConn, Hello, Open, Opened, Welcome
from rtpllm.transfer.shm import RING_PREFIX, sweep_stale_rings

pytestmark = pytest.mark.timeout(30)

BACKENDS = ["tcp", "shm"] if shm_available() else ["tcp"]
NS = b"test-namespace-0"


def make_pool(
    num_blocks: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0, layers: int = 3
) -> torch.Tensor:
    """[layers, 2, num_blocks + 1, block_size 4, heads 2, head_dim 8] of random bits."""
    kv = torch.empty(layers, 2, num_blocks + 1, 4, 2, 8, dtype=dtype)
    bits = kv.view(torch.int16 if kv.element_size() == 2 else torch.int32)
    bits.random_(generator=torch.Generator().manual_seed(seed))
    return kv


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_transferred(
    src: torch.Tensor, src_ids: Sequence[int], dst: torch.Tensor, before: torch.Tensor, dst_ids: Sequence[int]
) -> None:
    """dst blocks dst_ids hold src blocks src_ids bit for bit; every other dst block is unchanged."""
    assert torch.equal(bits(dst[:, :, list(dst_ids)]), bits(src[:, :, list(src_ids)]))
    others = [b for b in range(dst.shape[2]) if b not in set(dst_ids)]
    assert torch.equal(bits(dst[:, :, others]), bits(before[:, :, others]))


@contextlib.asynccontextmanager
async def pair(
    src: torch.Tensor,
    dst: torch.Tensor,
    backend: str,
    ns_src: bytes = NS,
    ns_dst: bytes = NS,
    **receiver_kw: object,
) -> AsyncIterator[tuple[KVReceiver, KVSender]]:
    receiver = KVReceiver(dst, KVLayout.of(dst, ns_dst), **receiver_kw)  # type: ignore[arg-type]
    await receiver.start()
    sender = KVSender(src, KVLayout.of(src, ns_src), prefer=[backend])
    try:
        yield receiver, sender
    finally:
        await sender.close()
        await receiver.close()


def chunks(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """Split positions [0, n) into random (start, length) pieces, in random order."""
    cuts = sorted(rng.sample(range(1, n), k=min(n - 1, rng.randint(1, 5)))) if n > 1 else []
    bounds = [0, *cuts, n]
    pieces = [(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
    rng.shuffle(pieces)
    return pieces


# ------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
async def test_blocks_arrive_bit_exact_and_nothing_else_changes(
    backend: str, dtype: torch.dtype, seed: int
) -> None:
    rng = random.Random(seed)
    src = make_pool(rng.randint(20, 40), dtype, seed=seed)
    dst = make_pool(rng.randint(30, 60), dtype, seed=seed + 100)
    before = dst.clone()
    n = rng.randint(5, 18)
    src_ids = rng.sample(range(src.shape[2]), n)  # the scratch block too: any block may be sent
    dst_ids = rng.sample(range(dst.shape[2]), n)
    # Tiny frames (3 blocks) and a 2-slot shm ring: many frames, slot reuse, back-pressure.
    async with pair(src, dst, backend, shm_slots=2, shm_slot_bytes=1 << 10) as (receiver, sender):
        sender.max_frame_bytes = 3 * KVLayout.of(src, NS).block_layer_bytes
        incoming = receiver.expect("t", dst_ids, lease_s=10)
        out = await sender.open(receiver.endpoint, "t", n, timeout_s=10, token=incoming.token)
        assert out.backend == backend
        for start, length in chunks(n, rng):
            await out.send(src_ids[start : start + length], start)
        sent = await out.finish()
        got = await incoming.wait()
    assert incoming.blocks_received == n
    unit = KVLayout.of(src, NS).block_layer_bytes
    assert sent.nbytes == got.nbytes == n * unit * src.shape[0]
    assert (sent.backend, sent.num_blocks, got.backend, got.num_blocks) == (backend, n, backend, n)
    assert_transferred(src, src_ids, dst, before, dst_ids)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_connections_are_reused_and_transfers_run_concurrently(backend: str) -> None:
    src, dst = make_pool(64, seed=1), make_pool(64, seed=2)
    before = dst.clone()
    async with pair(src, dst, backend) as (receiver, sender):
        # Sequential transfers share one connection.
        for i in range(3):
            ids = [3 * i, 3 * i + 1, 3 * i + 2]
            incoming = receiver.expect(f"seq{i}", ids, lease_s=10)
            out = await sender.open(receiver.endpoint, f"seq{i}", 3, timeout_s=10, token=incoming.token)
            await out.send([10 + i, 20 + i, 30 + i], 0)
            await out.finish()
            await incoming.wait()
            dst_ids, src_ids = ids, [10 + i, 20 + i, 30 + i]
            assert torch.equal(bits(dst[:, :, dst_ids]), bits(src[:, :, src_ids]))
        assert len(sender._links) == 1
        # Concurrent transfers each get a connection.
        plans = {
            f"c{k}": (list(range(20 + 8 * k, 28 + 8 * k)), random.Random(k).sample(range(64), 8))
            for k in range(3)
        }
        incomings = {tid: receiver.expect(tid, dst_ids, lease_s=10) for tid, (dst_ids, _) in plans.items()}
        waits = [t.wait() for t in incomings.values()]

        async def run(tid: str, src_ids: list[int]) -> None:
            out = await sender.open(receiver.endpoint, tid, 8, timeout_s=10, token=incomings[tid].token)
            for j in range(0, 8, 2):
                await out.send(src_ids[j : j + 2], j)
                await asyncio.sleep(0)
            await out.finish()

        await asyncio.gather(*(run(tid, src_ids) for tid, (_, src_ids) in plans.items()), *waits)
    all_dst = [b for i in range(3) for b in (3 * i, 3 * i + 1, 3 * i + 2)]
    all_src = [b for i in range(3) for b in (10 + i, 20 + i, 30 + i)]
    for dst_ids, src_ids in plans.values():
        all_dst += dst_ids
        all_src += src_ids
    assert_transferred(src, all_src, dst, before, all_dst)


async def test_tensor_and_numpy_block_ids_are_accepted() -> None:
    src, dst = make_pool(8, seed=3), make_pool(8, seed=4)
    async with pair(src, dst, "tcp") as (receiver, sender):
        incoming = receiver.expect("ids", np.array([7, 6]), lease_s=10)
        out = await sender.open(receiver.endpoint, "ids", 2, timeout_s=10, token=incoming.token)
        await out.send(torch.tensor([1]), 0)
        await out.send(np.array([2]), 1)
        await out.finish()
        await incoming.wait()
    assert torch.equal(bits(dst[:, :, [7, 6]]), bits(src[:, :, [1, 2]]))


# ------------------------------------------------------------------------------ refusals


async def test_namespace_mismatch_is_refused_naming_both_values() -> None:
    src, dst = make_pool(4), make_pool(4)
    async with pair(src, dst, "tcp", ns_src=b"\x01" * 4, ns_dst=b"\x02" * 4) as (receiver, sender):
        incoming = receiver.expect("t", [0], lease_s=10)
        with pytest.raises(TransferRefused, match="namespace: sender=01010101 receiver=02020202"):
            await sender.open(receiver.endpoint, "t", 1, timeout_s=10, token=incoming.token)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_layout_mismatch_is_refused(backend: str) -> None:
    src, dst = make_pool(4, torch.float32), make_pool(4, torch.bfloat16, layers=2)
    async with pair(src, dst, backend) as (receiver, sender):
        incoming = receiver.expect("t", [0], lease_s=10)
        with pytest.raises(TransferRefused) as info:
            await sender.open(receiver.endpoint, "t", 1, timeout_s=10, token=incoming.token)
    assert "num_layers: sender=3 receiver=2" in str(info.value)
    assert "dtype: sender=float32 receiver=bfloat16" in str(info.value)


async def test_unknown_transfer_and_wrong_size_are_refused() -> None:
    src, dst = make_pool(4), make_pool(4)
    async with pair(src, dst, "tcp") as (receiver, sender):
        with pytest.raises(TransferRefused, match="unknown transfer 'nope'"):
            await sender.open(receiver.endpoint, "nope", 1, timeout_s=10, token=b"x" * 16)
        incoming = receiver.expect("t", [0, 1], lease_s=10)
        with pytest.raises(TransferRefused, match="sender has 3 blocks, receiver expects 2"):
            await sender.open(receiver.endpoint, "t", 3, timeout_s=10, token=incoming.token)
        # The refusal did not consume the expectation (nor its token): the right sender still gets through.
        out = await sender.open(receiver.endpoint, "t", 2, timeout_s=10, token=incoming.token)
        await out.send([2, 3], 0)
        await out.finish()
        await incoming.wait()


async def hello_reply(receiver: KVReceiver, src: torch.Tensor, backend: str, transfer_id: str, token: bytes) -> object:
    """What the receiver answers a raw Hello naming `transfer_id` with `token`."""
    layout = KVLayout.of(src, NS)
    conn = await FrameConn.connect(receiver.endpoint.host, receiver.endpoint.port)
    try:
        hello = Hello(
            PROTOCOL_VERSION, backend, receiver.endpoint.host_id, layout.namespace, layout.num_layers,
            layout.block_size, layout.num_kv_heads, layout.head_dim, layout.dtype, 1 << 20, transfer_id, token,
        )  # fmt: skip
        await conn.send(hello)
        frame, _ = await asyncio.wait_for(conn.recv_frame(), 10)
        return frame
    finally:
        conn.release()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_connection_without_a_valid_token_is_refused(backend: str) -> None:
    src, dst = make_pool(8, seed=8), make_pool(8, seed=9)
    before = dst.clone()
    async with pair(src, dst, backend) as (receiver, sender):
        incoming = receiver.expect("t", [1, 2], lease_s=10)
        assert len(incoming.token) == 16
        assert receiver.expect("other", [3], lease_s=10).token != incoming.token
        # The handshake itself is refused: no shm ring, no pool handle for a peer without the token.
        for token, reason in [(b"", "no token presented"), (b"\0" * 16, "wrong token"), (incoming.token[:8], "wrong token")]:
            reply = await hello_reply(receiver, src, backend, "t", token)
            assert isinstance(reply, Error) and reply.code == TransferRefused.code and reason in reply.message, reply
        reply = await hello_reply(receiver, src, backend, "nope", incoming.token)  # a real token, another id
        assert isinstance(reply, Error) and "unknown transfer 'nope'" in reply.message
        with pytest.raises(TransferRefused, match="wrong token"):
            await sender.open(receiver.endpoint, "t", 2, timeout_s=10, token=bytes(16))
        with pytest.raises(TransferRefused, match="no token presented"):
            await sender.open(receiver.endpoint, "t", 2, timeout_s=10, token=b"")
        assert incoming.state == "expected"  # refusals leave the transfer to its real sender
        # On a connection already past its handshake, Open checks the token too.
        first = receiver.expect("first", [0], lease_s=10)
        out = await sender.open(receiver.endpoint, "first", 1, timeout_s=10, token=first.token)
        await out.send([0], 0)
        await out.finish()
        await first.wait()
        assert len(sender._links) == 1  # the idle connection is reused for the next open
        with pytest.raises(TransferRefused, match="wrong token"):
            await sender.open(receiver.endpoint, "t", 2, timeout_s=10, token=b"\1" * 16)
        out = await sender.open(receiver.endpoint, "t", 2, timeout_s=10, token=incoming.token)
        await out.send([5, 6], 0)
        await out.finish()
        await incoming.wait()
    assert_transferred(src, [0, 5, 6], dst, before, [0, 1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_token_opens_its_transfer_once(backend: str) -> None:
    src, dst = make_pool(8), make_pool(8)
    async with pair(src, dst, backend) as (receiver, sender):
        incoming = receiver.expect("t", [1, 2], lease_s=10)
        token = incoming.token
        out = await sender.open(receiver.endpoint, "t", 2, timeout_s=10, token=token)
        assert incoming.token == b""  # forgotten once used
        # A replay while the transfer runs: refused at the handshake, and at Open.
        replayer = KVSender(src, KVLayout.of(src, NS), prefer=[backend])
        try:
            with pytest.raises(TransferRefused, match="already used"):
                await replayer.open(receiver.endpoint, "t", 2, timeout_s=10, token=token)
            reply = await hello_reply(receiver, src, backend, "t", token)
            assert isinstance(reply, Error) and "already used" in reply.message
            await out.send([3, 4], 0)
            await out.finish()
            await incoming.wait()
            # And after it completed.
            with pytest.raises(TransferRefused, match="already complete"):
                await replayer.open(receiver.endpoint, "t", 2, timeout_s=10, token=token)
        finally:
            await replayer.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_allow_fewer_lets_the_sender_fill_a_leading_part(backend: str) -> None:
    """The kvstore's get: the receiver expects 5 blocks, the sender has only 3 of them."""
    src, dst = make_pool(8, seed=3), make_pool(8, seed=4)
    before = dst.clone()
    async with pair(src, dst, backend) as (receiver, sender):
        incoming = receiver.expect("t", [6, 1, 4, 2, 0], lease_s=10, allow_fewer=True)
        out = await sender.open(receiver.endpoint, "t", 3, timeout_s=10, token=incoming.token)
        await out.send([5, 6, 7], 0)
        await out.finish()
        stats = await incoming.wait()
        assert incoming.num_blocks == stats.num_blocks == 3
        assert_transferred(src, [5, 6, 7], dst, before, [6, 1, 4])  # blocks 2 and 0 untouched
        # Without allow_fewer a shorter sender is still refused.
        shorter = receiver.expect("u", [3, 5], lease_s=10)
        with pytest.raises(TransferRefused, match="sender has 1 blocks, receiver expects 2"):
            await sender.open(receiver.endpoint, "u", 1, timeout_s=10, token=shorter.token)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_duplicate_frames_are_refused(backend: str) -> None:
    src, dst = make_pool(8), make_pool(8)
    before = dst.clone()
    async with pair(src, dst, backend) as (receiver, sender):
        incoming = receiver.expect("dup", [4, 5], lease_s=10)
        out = await sender.open(receiver.endpoint, "dup", 2, timeout_s=10, token=incoming.token)
        await out.send([1], 0)
        with pytest.raises(TransferRefused, match="duplicate"):
            await out.send([2], 0)  # position 0 again
            await out.send([3], 1)
            await out.finish()
        with pytest.raises(TransferRefused, match="duplicate"):
            await incoming.wait()
    others = [b for b in range(dst.shape[2]) if b not in (4, 5)]
    assert torch.equal(bits(dst[:, :, others]), bits(before[:, :, others]))


async def test_bad_arguments_raise_before_anything_is_sent() -> None:
    src, dst = make_pool(4), make_pool(4)
    async with pair(src, dst, "tcp") as (receiver, sender):
        with pytest.raises(ValueError, match="out of range"):
            receiver.expect("a", [0, 5], lease_s=1)
        with pytest.raises(ValueError, match="distinct"):
            receiver.expect("a", [1, 1], lease_s=1)
        incoming = receiver.expect("a", [0, 1], lease_s=10)
        with pytest.raises(ValueError, match="already expected"):
            receiver.expect("a", [2], lease_s=1)
        out = await sender.open(receiver.endpoint, "a", 2, timeout_s=10, token=incoming.token)
        with pytest.raises(ValueError, match="source block ids out of range"):
            await out.send([9], 0)
        with pytest.raises(ValueError, match=r"positions \[1, 3\) outside \[0, 2\)"):
            await out.send([0, 1], 1)
        await out.send([0], 0)
        with pytest.raises(TransferError, match="1 of 2 blocks not sent"):
            await out.finish()
        await out.send([1], 1)
        await out.finish()
        await incoming.wait()


async def test_backend_choice_follows_preference_host_and_endpoint() -> None:
    src, dst = make_pool(4), make_pool(4)
    sender = KVSender(src, KVLayout.of(src, NS))  # default preference: cuda_ipc, shm, tcp
    here = KVReceiver(dst, KVLayout.of(dst, NS))
    await here.start()
    try:
        ep = here.endpoint
        assert sender.backends_for(ep) == (
            ["shm", "tcp"] if shm_available() else ["tcp"]
        )  # CPU pools: no cuda_ipc
        far = KVEndpoint(ep.host, ep.port, "another-host/boot", "cpu", ep.backends)
        assert sender.backends_for(far) == ["tcp"]
        tcp_only = KVSender(src, KVLayout.of(src, NS), prefer=["shm"])
        with pytest.raises(TransferRefused, match="no backend in common"):
            await tcp_only.open(KVEndpoint(ep.host, ep.port, ep.host_id, "cpu", ["tcp"]), "x", 1, timeout_s=5, token=b"")
        await tcp_only.close()
    finally:
        await sender.close()
        await here.close()


# ------------------------------------------------------------------------ leases, timeouts


@pytest.mark.parametrize("backend", BACKENDS)
async def test_lease_expiry_fails_the_transfer_on_both_sides(backend: str) -> None:
    src, dst = make_pool(8), make_pool(8)
    before = dst.clone()
    async with pair(src, dst, backend) as (receiver, sender):
        incoming = receiver.expect("slow", [0, 1, 2], lease_s=0.4)
        token = incoming.token
        out = await sender.open(receiver.endpoint, "slow", 3, timeout_s=10, token=token)
        await out.send([5], 0)
        with pytest.raises(TransferTimeout, match="lease"):
            await incoming.wait()
        assert incoming.blocks_received == 1
        with pytest.raises(TransferTimeout):
            await asyncio.sleep(0.1)  # the receiver's error is on its way
            await out.send([6, 7], 1)
        # The receiver forgot it: a new sender is refused with the reason.
        with pytest.raises(TransferTimeout, match="lease"):
            await sender.open(receiver.endpoint, "slow", 3, timeout_s=10, token=token)
        # A lease also runs when no sender ever shows up.
        never = receiver.expect("never", [3], lease_s=0.1)
        with pytest.raises(TransferTimeout):
            await never.wait()
    others = [b for b in range(dst.shape[2]) if b != 0]
    assert torch.equal(bits(dst[:, :, others]), bits(before[:, :, others]))


async def test_sender_times_out_when_the_receiver_never_acks() -> None:
    """A fake receiver that accepts everything and acknowledges nothing."""
    src = make_pool(4)
    layout = KVLayout.of(src, NS)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    loop = asyncio.get_running_loop()

    async def mute_receiver() -> None:
        sock, _ = await loop.sock_accept(listener)
        conn = FrameConn(sock)
        with contextlib.suppress(ConnectionError):
            while True:
                frame, _ = await conn.recv_frame()
                if isinstance(frame, Hello):
                    await conn.send(Welcome("tcp"))
                elif isinstance(frame, Open):
                    await conn.send(Opened(frame.transfer_id))
        conn.release()

    server = asyncio.create_task(mute_receiver())
    sender = KVSender(src, layout, prefer=["tcp"])
    try:
        ep = KVEndpoint("127.0.0.1", listener.getsockname()[1], "elsewhere", "cpu", ["tcp"])
        out = await sender.open(ep, "t", 1, timeout_s=0.3, token=b"x" * 16)
        await out.send([0], 0)
        with pytest.raises(TransferTimeout, match="no acknowledgement"):
            await out.finish()
    finally:
        await sender.close()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        listener.close()


async def test_connect_to_nobody_fails_cleanly() -> None:
    src = make_pool(2)
    sender = KVSender(src, KVLayout.of(src, NS), prefer=["tcp"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    with pytest.raises(TransferAborted, match="cannot connect"):
        await sender.open(KVEndpoint("127.0.0.1", port, "x", "cpu", ["tcp"]), "t", 1, timeout_s=5, token=b"x" * 16)
    await sender.close()


# ---------------------------------------------------------------------- corruption, drops


@pytest.mark.parametrize("backend", BACKENDS)
async def test_corrupted_payload_is_detected(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = make_pool(8), make_pool(8)
    before = dst.clone()
    async with pair(src, dst, backend) as (receiver, sender):
        incoming = receiver.expect("bad", [2, 3, 4], lease_s=10)
        out = await sender.open(receiver.endpoint, "bad", 3, timeout_s=10, token=incoming.token)
        await out.send([0], 0)
        monkeypatch.setattr(faults, "corrupt_payloads", 1)
        with pytest.raises(ChecksumMismatch, match="checksum mismatch"):
            await out.send([1, 2], 1)
            await out.finish()
        with pytest.raises(ChecksumMismatch):
            await incoming.wait()
    assert faults.corrupt_payloads == 0
    others = [b for b in range(dst.shape[2]) if b not in (2, 3, 4)]
    assert torch.equal(bits(dst[:, :, others]), bits(before[:, :, others]))
    if backend == "shm":  # staged payloads are verified before they land
        assert torch.equal(bits(dst[:, :, [3, 4]]), bits(before[:, :, [3, 4]]))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_dropped_sender_connection_aborts_the_transfer(backend: str) -> None:
    src, dst = make_pool(8), make_pool(8)
    async with pair(src, dst, backend) as (receiver, sender):
        incoming = receiver.expect("drop", [0, 1], lease_s=10)
        out = await sender.open(receiver.endpoint, "drop", 2, timeout_s=10, token=incoming.token)
        await out.send([3], 0)
        sock = out._link.conn.sock  # what a crash does: the socket goes away, RST
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        out._link.conn.release()
        with pytest.raises(TransferAborted, match="connection"):
            await incoming.wait()
        with pytest.raises(TransferError):
            await out.send([4], 1)
            await out.finish()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_receiver_cancel_makes_the_sender_fail(backend: str) -> None:
    src, dst = make_pool(8), make_pool(8)
    async with pair(src, dst, backend) as (receiver, sender):
        incoming = receiver.expect("c", [0, 1], lease_s=10)
        token = incoming.token
        out = await sender.open(receiver.endpoint, "c", 2, timeout_s=10, token=token)
        await out.send([3], 0)
        incoming.cancel()
        with pytest.raises(TransferAborted, match="cancelled by the receiver"):
            await incoming.wait()
        with pytest.raises(TransferAborted, match="cancelled by the receiver"):
            await out.send([4], 1)
            await out.finish()
        # Later frames for it are refused, and the receiver serves the next transfer.
        with pytest.raises(TransferAborted):
            await sender.open(receiver.endpoint, "c", 2, timeout_s=10, token=token)
        nxt = receiver.expect("d", [2], lease_s=10)
        out = await sender.open(receiver.endpoint, "d", 1, timeout_s=10, token=nxt.token)
        await out.send([5], 0)
        await out.finish()
        await nxt.wait()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_sender_abort_reaches_the_receiver(backend: str) -> None:
    src, dst = make_pool(8), make_pool(8)
    async with pair(src, dst, backend) as (receiver, sender):
        incoming = receiver.expect("a", [0, 1], lease_s=10)
        out = await sender.open(receiver.endpoint, "a", 2, timeout_s=10, token=incoming.token)
        await out.send([3], 0)
        await out.abort("prefill failed")
        await out.abort("twice is fine")
        with pytest.raises(TransferAborted, match="prefill failed"):
            await incoming.wait()
        with pytest.raises(TransferAborted):
            await out.send([4], 1)


async def test_receiver_close_fails_open_transfers_on_both_sides() -> None:
    src, dst = make_pool(8), make_pool(8)
    receiver = KVReceiver(dst, KVLayout.of(dst, NS))
    await receiver.start()
    sender = KVSender(src, KVLayout.of(src, NS), prefer=["tcp"])
    incoming = receiver.expect("x", [0, 1], lease_s=10)
    out = await sender.open(receiver.endpoint, "x", 2, timeout_s=10, token=incoming.token)
    await out.send([1], 0)
    await receiver.close()
    with pytest.raises(TransferAborted):
        await incoming.wait()
    with pytest.raises(TransferAborted):
        await out.send([2], 1)
        await out.finish()
    await sender.close()


@pytest.mark.skipif(not shm_available(), reason="needs /dev/shm")
async def test_killed_sender_process_aborts_and_leaves_no_shm_ring() -> None:
    """A real crash: a sender process SIGKILLed mid-transfer (shm backend)."""
    dst = make_pool(64, layers=2)
    receiver = KVReceiver(dst, KVLayout.of(dst, NS), backends=["shm"])
    await receiver.start()
    ep = receiver.endpoint
    incoming = receiver.expect("crash", list(range(64)), lease_s=30)
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal, torch
        from rtpllm.transfer import KVEndpoint, KVLayout, KVSender
        async def main():
            kv = torch.zeros(2, 2, 65, 4, 2, 8, dtype=torch.bfloat16)
            sender = KVSender(kv, KVLayout.of(kv, {NS!r}), prefer=["shm"])
            ep = KVEndpoint({ep.host!r}, {ep.port}, {ep.host_id!r}, "cpu", ["shm"])
            out = await sender.open(ep, "crash", 64, timeout_s=10, token={incoming.token!r})
            await out.send(list(range(10)), 0)
            print("sent", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"sent"
        for _ in range(500):  # sent = handed to the ring/socket; landing takes a moment
            if incoming.blocks_received == 10:
                break
            await asyncio.sleep(0.01)
        assert incoming.blocks_received == 10
        proc.send_signal(signal.SIGKILL)
        with pytest.raises(TransferAborted):
            await asyncio.wait_for(incoming.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await receiver.close()
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(f"{RING_PREFIX}{os.getpid()}-")]


@pytest.mark.skipif(not shm_available(), reason="needs /dev/shm")
async def test_shm_rings_are_cleaned_up() -> None:
    mine = f"{RING_PREFIX}{os.getpid()}-"
    src, dst = make_pool(4), make_pool(4)
    async with pair(src, dst, "shm") as (receiver, sender):
        incoming = receiver.expect("s", [0], lease_s=10)
        out = await sender.open(receiver.endpoint, "s", 1, timeout_s=10, token=incoming.token)
        # The sender unlinked the ring's name as soon as it had mapped it.
        assert not [n for n in os.listdir(SHM_DIR) if n.startswith(mine)]
        await out.send([1], 0)
        await out.finish()
        await incoming.wait()
    # A ring left by a dead process is swept.
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    stale = os.path.join(SHM_DIR, f"{RING_PREFIX}{proc.stdout.strip()}-deadbeef")
    open(stale, "wb").close()
    assert sweep_stale_rings() >= 1
    assert not os.path.exists(stale)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_random_failures_end_consistently_and_never_touch_other_blocks(backend: str) -> None:
    """Cancels, aborts, leases running out, connections killed and senders closed at
    random moments, with several frames in flight: both sides always end (never hang),
    agree on success, and blocks outside the transfers' targets never change."""
    rng = random.Random(7)
    src = make_pool(60, seed=5, layers=4)
    dst = make_pool(80, seed=6, layers=4)
    before = dst.clone()
    targets = list(range(40))  # blocks 40..80 are never a target
    async with pair(src, dst, backend, shm_slots=3, shm_slot_bytes=1 << 10) as (receiver, _):
        for it in range(24):
            sender = KVSender(src, KVLayout.of(src, NS), prefer=[backend], threads=3)
            sender.max_frame_bytes = 2 * KVLayout.of(src, NS).block_layer_bytes
            ids = rng.sample(targets, 30)
            incoming = receiver.expect(f"r{it}", ids, lease_s=rng.choice([0.01, 0.05, 5.0]))
            mode = rng.choice(["ok", "cancel", "abort", "kill", "close"])
            sent = received = "ok"
            try:
                out = await sender.open(receiver.endpoint, f"r{it}", 30, timeout_s=5, token=incoming.token)
                for k in range(0, 30, 10):
                    if mode == "cancel" and k == 10:
                        incoming.cancel()
                    await out.send(rng.sample(range(61), 10), k)
                    if k == 10 and mode == "abort":
                        await out.abort("test")
                    if k == 10 and mode == "kill":
                        out._link.conn.release()
                if mode == "close":
                    await sender.close()
                await out.finish()
            except TransferError as exc:
                sent = type(exc).__name__
            try:
                await asyncio.wait_for(incoming.wait(), 10)
            except TransferError as exc:
                received = type(exc).__name__
            await sender.close()
            assert (sent == "ok") == (received == "ok"), (mode, sent, received)
            if mode != "ok":
                assert received != "ok", mode
    assert torch.equal(bits(dst[:, :, 40:]), bits(before[:, :, 40:]))


# -------------------------------------------------------------------------- checksum


def test_weighted_sum_detects_corruptions_a_plain_sum_misses() -> None:
    x = torch.randn(2, 5, 4, 2, 8).to(torch.bfloat16)

    def s(t: torch.Tensor) -> int:
        acc = WeightedSum(t.device)
        acc.update(t)
        return acc.value()

    base = s(x)
    assert s(x.clone()) == base
    words = x.clone().reshape(-1).view(torch.int32)
    flipped = words.clone()
    flipped[7] ^= 1 << 13
    assert s(flipped.view(torch.bfloat16).view_as(x)) != base
    swapped = words.clone()
    swapped[[3, 9]] = swapped[[9, 3]]
    if swapped[3] != swapped[9]:
        assert s(swapped.view(torch.bfloat16).view_as(x)) != base
    # Blocks in the wrong order: same multiset of words, another checksum.
    assert s(x[:, [1, 0, 2, 3, 4]]) != base
    # Chunked updates equal one update over the concatenation.
    acc = WeightedSum(x.device)
    acc.update(x[0])
    acc.update(x[1])
    assert acc.value() == base


def test_error_frames_map_to_exceptions() -> None:
    from rtpllm.transfer.errors import error_from_code

    for cls in (TransferTimeout, TransferRefused, ChecksumMismatch, TransferAborted):
        exc = error_from_code(cls.code, "m")
        assert type(exc) is cls and str(exc) == "m"
    assert type(error_from_code("new-code", "m")) is TransferError
    assert Error("t", "refused", "m").seq == -1
