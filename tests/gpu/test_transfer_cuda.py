"""The KV data plane with CUDA pools: tcp and shm through pinned staging on side streams,
and cuda_ipc device to device between two processes (a spawned receiver: a process
cannot open its own IPC handles). Bit-exact, nothing else in the receiver's pool changes.
The same for mixed per-layer pools (`LayerPoolBlocks`: one page tensor per layer, each
layer's own size), whose whole blocks (the tiers' path) round-trip too.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import torch

from rtpllm.transfer import (
    ChecksumMismatch,
    KVLayout,
    KVReceiver,
    KVSender,
    TransferAborted,
    TransferRefused,
    faults,
)
from rtpllm.transfer.blocks import LayerPoolBlocks
from rtpllm.transfer.endpoint import shm_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NS = b"gpu-test-namespace"
SHAPE = (4, 2, 0, 16, 8, 128)  # Llama-8B blocks, 4 layers


def make_pool(num_blocks: int, device: str, seed: int) -> torch.Tensor:
    shape = list(SHAPE)
    shape[2] = num_blocks + 1
    kv = torch.empty(shape, dtype=torch.bfloat16, device=device)
    kv.view(torch.int16).random_(generator=torch.Generator(device=device).manual_seed(seed))
    return kv


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize(
    ("backend", "src_dev", "dst_dev"),
    [("tcp", "cuda", "cuda"), ("tcp", "cuda", "cpu"), ("tcp", "cpu", "cuda"), ("shm", "cuda", "cuda")],
)
async def test_cuda_pools_over_tcp_and_shm(backend: str, src_dev: str, dst_dev: str) -> None:
    if backend == "shm" and not shm_available():
        pytest.skip("needs /dev/shm")
    rng = random.Random(0)
    src, dst = make_pool(300, src_dev, 1), make_pool(400, dst_dev, 2)
    before = dst.clone()
    n = 200
    src_ids, dst_ids = rng.sample(range(301), n), rng.sample(range(401), n)
    receiver = KVReceiver(dst, KVLayout.of(dst, NS))
    await receiver.start()
    sender = KVSender(src, KVLayout.of(src, NS), prefer=[backend], max_frame_bytes=1 << 20)
    try:
        incoming = receiver.expect("t", dst_ids, lease_s=60)
        out = await sender.open(receiver.endpoint, "t", n, timeout_s=60, token=incoming.token)
        assert out.backend == backend
        for start in range(0, n, 37):  # chunked prefill: several sends
            await out.send(src_ids[start : start + 37], start)
        await out.finish()
        await incoming.wait()
    finally:
        await sender.close()
        await receiver.close()
    # No synchronize here on purpose: wait() promises the blocks are visible to later work.
    assert torch.equal(bits(dst[:, :, dst_ids]).cpu(), bits(src[:, :, src_ids]).cpu())
    others = sorted(set(range(401)) - set(dst_ids))
    assert torch.equal(bits(dst[:, :, others]), bits(before[:, :, others]))


# ------------------------------------------------------------- cuda_ipc, two processes


def _receiver_child(conn: Any, num_blocks: int, mixed: bool) -> None:
    asyncio.run(_receive(conn, num_blocks, mixed))


async def _receive(conn: Any, num_blocks: int, mixed: bool) -> None:
    """The spawned receiver: answers the parent's `expect` (with the one-time token, as
    NATS would carry it; optionally cancelling after some blocks), `pool` (its pool's
    bytes) and anything else as quit."""
    loop = asyncio.get_running_loop()
    if mixed:
        blocks = make_mixed(num_blocks, "cuda", 2)
        receiver = KVReceiver(blocks, backends=["cuda_ipc"])
    else:
        kv = make_pool(num_blocks, "cuda", 2)
        receiver = KVReceiver(kv, KVLayout.of(kv, NS), backends=["cuda_ipc"])
    await receiver.start()
    conn.send(receiver.endpoint)
    while True:
        cmd, *args = await loop.run_in_executor(None, conn.recv)
        if cmd == "expect":
            transfer_id, ids, cancel_after = args
            incoming = receiver.expect(transfer_id, ids, lease_s=60)
            conn.send(("ready", incoming.token))
            if cancel_after is not None:
                while incoming.blocks_received < cancel_after:
                    await asyncio.sleep(0.005)
                incoming.cancel()
            try:
                stats = await incoming.wait()
                conn.send(("ok", stats.backend, stats.num_blocks))
            except Exception as exc:  # noqa: BLE001 -- reported to the parent
                conn.send(("error", type(exc).__name__, str(exc)))
        elif cmd == "pool":
            if mixed:
                conn.send([p.view(torch.uint8).cpu().numpy().tobytes() for p in blocks.pages])
            else:
                conn.send(kv.view(torch.int16).cpu().numpy().tobytes())
        else:
            break
    await receiver.close()


@contextlib.asynccontextmanager
async def spawned_receiver(
    num_blocks: int, mixed: bool
) -> AsyncIterator[tuple[Any, Callable[..., Awaitable[Any]], Callable[[], Awaitable[Any]]]]:
    """A cuda_ipc receiver in a spawned process (a process cannot open its own IPC
    handles): yields its endpoint, `ask(*msg)` (send, then await the reply) and `reply()`
    (await the next message); it is told to quit and joined (killed if stuck) after."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_child, args=(child, num_blocks, mixed), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()

    async def reply() -> Any:
        return await loop.run_in_executor(None, parent.recv)

    async def ask(*msg: object) -> Any:
        parent.send(msg)
        return await reply()

    try:
        endpoint = await reply()
        yield endpoint, ask, reply
        parent.send(("quit",))
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


async def test_cuda_ipc_between_two_processes() -> None:
    async with spawned_receiver(256, mixed=False) as (endpoint, ask, reply):
        assert endpoint.backends == ["cuda_ipc"]
        src = make_pool(256, "cuda", 1)
        before = torch.from_numpy(np.frombuffer(await ask("pool"), dtype=np.int16).copy()).view(
            make_pool(256, "cpu", 0).shape
        )
        sender = KVSender(src, KVLayout.of(src, NS), max_frame_bytes=4 << 20)
        rng = random.Random(3)
        src_ids, dst_ids = rng.sample(range(257), 150), rng.sample(range(257), 150)
        try:
            # 1. A transfer in several sends, bit exact, nothing else touched.
            ready, token = await ask("expect", "ok", dst_ids, None)
            assert ready == "ready"
            # Without the token the receiver hands out no IPC handle of its pool.
            with pytest.raises(TransferRefused, match="wrong token"):
                await sender.open(endpoint, "ok", 150, timeout_s=60, token=bytes(16))
            out = await sender.open(endpoint, "ok", 150, timeout_s=60, token=token)
            assert out.backend == "cuda_ipc"
            for start in range(0, 150, 40):
                await out.send(src_ids[start : start + 40], start)
            stats = await out.finish()
            assert stats.nbytes == 150 * KVLayout.of(src, NS).block_layer_bytes * 4
            assert await reply() == ("ok", "cuda_ipc", 150)
            after = torch.from_numpy(np.frombuffer(await ask("pool"), dtype=np.int16).copy()).view(
                before.shape
            )
            assert torch.equal(after[:, :, dst_ids], bits(src[:, :, src_ids]).cpu())
            others = sorted(set(range(257)) - set(dst_ids))
            assert torch.equal(after[:, :, others], before[:, :, others])

            # 2. A corrupted checksum is caught on the receiver's GPU.
            ready, token = await ask("expect", "bad", [0, 1], None)
            out = await sender.open(endpoint, "bad", 2, timeout_s=60, token=token)
            faults.corrupt_payloads = 1
            with pytest.raises(ChecksumMismatch):
                await out.send([5, 6], 0)
                await out.finish()
            answer = await reply()
            assert answer[:2] == ("error", "ChecksumMismatch")

            # 3. Cancel on the receiver: the sender stops, confirms, and the receiver's
            # wait() raises only after that (one-sided writes).
            ready, token = await ask("expect", "cancel", list(range(100, 164)), 8)
            out = await sender.open(endpoint, "cancel", 64, timeout_s=60, token=token)
            with pytest.raises(TransferAborted, match="cancelled"):
                for start in range(0, 64, 8):
                    await out.send(list(range(start, start + 8)), start)
                    await asyncio.sleep(0.05)
                await out.finish()
            answer = await reply()
            assert answer[:2] == ("error", "TransferAborted")
        finally:
            faults.corrupt_payloads = 0
            await sender.close()


# ------------------------------------------------- mixed per-layer pools (layer pages)

MIXED = KVLayout.of_layers(NS, ("fp8", "bfloat16", "int8", "bfloat16"), 16, 8, 128)


def make_mixed(num_blocks: int, device: str, seed: int) -> LayerPoolBlocks:
    """A mixed per-layer pool of `num_blocks + 1` blocks of random bytes (Llama-8B-sized
    pages: fp8/int8 layers 132 bytes a row, bf16 256)."""
    blocks = LayerPoolBlocks.allocate(MIXED, num_blocks + 1, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for page in blocks.pages:
        page.view(torch.uint8).random_(generator=gen)
    return blocks


def mixed_bytes(blocks: LayerPoolBlocks, ids: list[int]) -> list[torch.Tensor]:
    return [p.view(torch.uint8)[:, ids].cpu() for p in blocks.pages]


@pytest.mark.parametrize(
    ("backend", "src_dev", "dst_dev"),
    [("tcp", "cuda", "cuda"), ("tcp", "cuda", "cpu"), ("tcp", "cpu", "cuda"), ("shm", "cuda", "cuda")],
)
async def test_mixed_cuda_pools_over_tcp_and_shm(backend: str, src_dev: str, dst_dev: str) -> None:
    if backend == "shm" and not shm_available():
        pytest.skip("needs /dev/shm")
    rng = random.Random(1)
    src, dst = make_mixed(300, src_dev, 1), make_mixed(400, dst_dev, 2)
    n = 200
    src_ids, dst_ids = rng.sample(range(301), n), rng.sample(range(401), n)
    others = sorted(set(range(401)) - set(dst_ids))
    before = mixed_bytes(dst, others)
    receiver = KVReceiver(dst)
    await receiver.start()
    sender = KVSender(src, prefer=[backend], max_frame_bytes=1 << 20)
    try:
        incoming = receiver.expect("t", dst_ids, lease_s=60)
        out = await sender.open(receiver.endpoint, "t", n, timeout_s=60, token=incoming.token)
        assert out.backend == backend
        for start in range(0, n, 37):
            await out.send(src_ids[start : start + 37], start)
        stats = await out.finish()
        await incoming.wait()
    finally:
        await sender.close()
        await receiver.close()
    assert stats.nbytes == n * MIXED.block_bytes
    for layer, (a, b) in enumerate(zip(mixed_bytes(src, src_ids), mixed_bytes(dst, dst_ids), strict=True)):
        assert torch.equal(a, b), layer
    assert all(torch.equal(a, b) for a, b in zip(mixed_bytes(dst, others), before, strict=True))


def test_mixed_cuda_pool_whole_blocks_round_trip() -> None:
    """read_blocks / write_blocks on CUDA layer pages (the tiers' path): block-major host
    bytes, each block's layers in order, back into other blocks bit for bit."""
    src, dst = make_mixed(64, "cuda", 3), make_mixed(64, "cuda", 4)
    ids, targets = [5, 63, 0, 17, 64, 9], [1, 2, 3, 40, 41, 64]
    host = src.host_buffer(len(ids) * src.block_bytes)
    src.follow_engine()
    src.read_blocks(np.asarray(ids), host)
    rows = host.numpy().reshape(len(ids), -1)
    for layer, offset in enumerate(MIXED.layer_offsets):
        size = MIXED.layer_bytes(layer)
        want = src.pages[layer].view(torch.uint8)[:, ids].transpose(0, 1).reshape(len(ids), size).cpu()
        assert np.array_equal(rows[:, offset : offset + size], want.numpy()), layer
    others = sorted(set(range(65)) - set(targets))
    before = mixed_bytes(dst, others)
    dst.write_blocks(np.asarray(targets), host, dst.engine_event())
    for a, b in zip(mixed_bytes(src, ids), mixed_bytes(dst, targets), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(mixed_bytes(dst, others), before, strict=True))


async def test_cuda_ipc_of_a_mixed_pool_between_two_processes() -> None:
    """cuda_ipc shares a mixed pool's byte buffer with per-layer offsets: the sender
    writes every layer's pages in place, the receiver's checksum over its pages agrees."""

    def as_pages(raw: list[bytes]) -> list[torch.Tensor]:
        return [torch.frombuffer(bytearray(b), dtype=torch.uint8).view(2, 257, -1) for b in raw]

    async with spawned_receiver(256, mixed=True) as (endpoint, ask, reply):
        src = make_mixed(256, "cuda", 1)
        before = as_pages(await ask("pool"))
        sender = KVSender(src, max_frame_bytes=4 << 20)
        rng = random.Random(5)
        src_ids, dst_ids = rng.sample(range(257), 150), rng.sample(range(257), 150)
        try:
            _, token = await ask("expect", "ok", dst_ids, None)
            out = await sender.open(endpoint, "ok", 150, timeout_s=60, token=token)
            assert out.backend == "cuda_ipc"
            for start in range(0, 150, 40):
                await out.send(src_ids[start : start + 40], start)
            stats = await out.finish()
            assert stats.nbytes == 150 * MIXED.block_bytes
            assert await reply() == ("ok", "cuda_ipc", 150)
            after = as_pages(await ask("pool"))
            others = sorted(set(range(257)) - set(dst_ids))
            for layer, (a, s) in enumerate(zip(after, mixed_bytes(src, src_ids), strict=True)):
                assert torch.equal(a[:, dst_ids], s), layer
                assert torch.equal(a[:, others], before[layer][:, others]), layer
            # A corrupted checksum is caught on the receiver's GPU.
            _, token = await ask("expect", "bad", [0, 1], None)
            out = await sender.open(endpoint, "bad", 2, timeout_s=60, token=token)
            faults.corrupt_payloads = 1
            with pytest.raises(ChecksumMismatch):
                await out.send([5, 6], 0)
                await out.finish()
            answer = await reply()
            assert answer[:2] == ("error", "ChecksumMismatch")
        finally:
            faults.corrupt_payloads = 0
            await sender.close()
