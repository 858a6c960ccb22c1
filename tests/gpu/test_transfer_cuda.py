"""The KV data plane with CUDA pools: tcp and shm through pinned staging on side streams,
and cuda_ipc device to device between two processes (a spawned receiver: a process
cannot open its own IPC handles). Bit-exact, nothing else in the receiver's pool changes.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
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


def _receiver_child(conn: Any, num_blocks: int) -> None:
    asyncio.run(_receive(conn, num_blocks))


async def _receive(conn: Any, num_blocks: int) -> None:
    loop = asyncio.get_running_loop()
    kv = make_pool(num_blocks, "cuda", 2)
    receiver = KVReceiver(kv, KVLayout.of(kv, NS), backends=["cuda_ipc"])
    await receiver.start()
    conn.send(receiver.endpoint)
    while True:
        cmd, *args = await loop.run_in_executor(None, conn.recv)
        if cmd == "expect":
            transfer_id, ids, cancel_after = args
            incoming = receiver.expect(transfer_id, ids, lease_s=60)
            conn.send(("ready", incoming.token))  # the one-time token, as NATS would carry it
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
            conn.send(kv.view(torch.int16).cpu().numpy().tobytes())
        else:
            break
    await receiver.close()


async def test_cuda_ipc_between_two_processes() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_child, args=(child, 256), daemon=True)
    proc.start()
    loop = asyncio.get_running_loop()

    async def ask(*msg: object) -> Any:
        parent.send(msg)
        return await loop.run_in_executor(None, parent.recv)

    try:
        endpoint = await loop.run_in_executor(None, parent.recv)
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
            assert await loop.run_in_executor(None, parent.recv) == ("ok", "cuda_ipc", 150)
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
            reply = await loop.run_in_executor(None, parent.recv)
            assert reply[:2] == ("error", "ChecksumMismatch")

            # 3. Cancel on the receiver: the sender stops, confirms, and the receiver's
            # wait() raises only after that (one-sided writes).
            ready, token = await ask("expect", "cancel", list(range(100, 164)), 8)
            out = await sender.open(endpoint, "cancel", 64, timeout_s=60, token=token)
            with pytest.raises(TransferAborted, match="cancelled"):
                for start in range(0, 64, 8):
                    await out.send(list(range(start, start + 8)), start)
                    await asyncio.sleep(0.05)
                await out.finish()
            reply = await loop.run_in_executor(None, parent.recv)
            assert reply[:2] == ("error", "TransferAborted")
        finally:
            faults.corrupt_payloads = 0
            await sender.close()
        parent.send(("quit",))
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
