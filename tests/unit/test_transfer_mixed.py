"""Mixed per-layer KV pools (a per-layer KV plan: each layer in its own format) on the
block movers' path, CPU: `LayerPoolBlocks` payloads and whole blocks round-trip bit for
bit, tcp and shm transfers land them bit for bit and touch nothing else, and two ends
whose per-layer formats differ are refused with a message that names them.

Pools hold random bit patterns, compared as bytes, layer by layer; layers differ in
size (fp8/int8 pages are head_dim + 4 bytes a row, bf16 2 x head_dim, fp32 4 x head_dim),
so a payload sized or placed by the wrong layer shows."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest
import torch

from rtpllm.kvcache.kv_format import KVCacheSpec
from rtpllm.kvcache.kv_pool import KVPool
from rtpllm.models.config import ModelConfig
from rtpllm.transfer import KVLayout, KVReceiver, KVSender, TransferRefused
from rtpllm.transfer.backend import BackendUnavailable
from rtpllm.transfer.blocks import LayerPoolBlocks, PoolBlocks, pool_blocks
from rtpllm.transfer.cuda_ipc import remote_pages
from rtpllm.transfer.endpoint import shm_available
from rtpllm.transfer.framing import (
    PROTOCOL_VERSION,
    Error,
    FrameConn,
    Hello,
    IpcPoolHandle,
    Open,
    Opened,
    TcpBlocks,
    Welcome,
)

pytestmark = pytest.mark.timeout(30)

BACKENDS = ["tcp", "shm"] if shm_available() else ["tcp"]
NS = b"mixed-namespace-"
FORMATS = ("fp8", "bfloat16", "int8", "float32")


def layout(formats: Sequence[str] = FORMATS, ns: bytes = NS) -> KVLayout:
    return KVLayout.of_layers(ns, tuple(formats), block_size=4, num_kv_heads=2, head_dim=8)


def make_pool(num_blocks: int, seed: int, formats: Sequence[str] = FORMATS) -> LayerPoolBlocks:
    """`num_blocks` blocks of random bytes in every layer."""
    blocks = LayerPoolBlocks.allocate(layout(formats), num_blocks)
    gen = torch.Generator().manual_seed(seed)
    for page in blocks.pages:
        page.view(torch.uint8).random_(generator=gen)
    return blocks


def pages(blocks: LayerPoolBlocks, ids: Sequence[int]) -> list[torch.Tensor]:
    """Per layer the bytes of blocks `ids` [2, len(ids), page bytes] (a copy)."""
    return [p.view(torch.uint8)[:, list(ids)].clone() for p in blocks.pages]


def assert_moved(
    src: LayerPoolBlocks,
    src_ids: Sequence[int],
    dst: LayerPoolBlocks,
    before: list[torch.Tensor],
    dst_ids: Sequence[int],
) -> None:
    """dst blocks `dst_ids` hold src blocks `src_ids` bit for bit in every layer; every
    other dst block is what it was (`before`: pages(dst, all ids) before the move)."""
    others = [b for b in range(dst.num_blocks) if b not in set(dst_ids)]
    for layer, (s, d) in enumerate(zip(pages(src, src_ids), pages(dst, dst_ids), strict=True)):
        assert torch.equal(s, d), f"layer {layer}"
        assert torch.equal(dst.pages[layer].view(torch.uint8)[:, others], before[layer][:, others]), (
            f"layer {layer}"
        )


def test_layout_sizes_each_layer_by_its_format() -> None:
    lay = layout()
    rows = [8 + 4, 8 * 2, 8 + 4, 8 * 4]  # values then the fp32 scale; bf16; fp32
    assert [lay.layer_bytes(i) for i in range(4)] == [2 * 4 * 2 * r for r in rows]
    assert lay.block_bytes == sum(2 * 4 * 2 * r for r in rows) and lay.max_layer_bytes == 2 * 4 * 2 * 32
    assert lay.layer_offsets == (0, 192, 448, 640)
    with pytest.raises(ValueError, match="use layer_bytes"):
        lay.block_layer_bytes  # noqa: B018 -- a mixed layout has no single per-layer size
    with pytest.raises(ValueError, match="no pool tensor"):
        PoolBlocks(torch.zeros(4, 2, 3, 4, 2, 8), lay)


def test_engine_pool_pages_are_the_blocks_the_movers_see() -> None:
    """`pool_blocks` over a mixed KVPool: its layout names the plan's formats, and the
    movers' pages are the attention caches' memory (a write through one is seen by the other)."""
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", family="llama", hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=64, vocab_size=100, max_position_embeddings=512, rms_norm_eps=1e-6,
    )  # fmt: skip
    spec = KVCacheSpec.resolve(3, torch.bfloat16, plan=["fp8", "auto", "int8"])
    pool = KVPool(cfg, 5, 4, torch.bfloat16, "cpu", spec=spec)
    blocks = pool_blocks(pool, NS)
    assert isinstance(blocks, LayerPoolBlocks) and blocks.num_blocks == 6  # the scratch block too
    assert blocks.layout == KVLayout.of_layers(NS, ("fp8", "bfloat16", "int8"), 4, 2, 16)
    k, v = pool.layer_caches()[1]
    v[3].fill_(1.5)
    out = blocks.host_buffer(blocks.payload_bytes(1, 1))
    blocks.gather(1, np.asarray([3]), out)
    assert torch.equal(out.view(torch.bfloat16).view(2, 4, 2, 16)[1], v[3])
    assert not out.view(torch.bfloat16).view(2, 4, 2, 16)[0].any()
    # A uniform pool is still its one tensor.
    uniform = KVPool(cfg, 5, 4, torch.bfloat16, "cpu", spec=KVCacheSpec.resolve(3, torch.bfloat16, "fp8"))
    assert isinstance(pool_blocks(uniform, NS), PoolBlocks)


@pytest.mark.parametrize("seed", [0, 1])
def test_payloads_and_whole_blocks_round_trip_bit_exact(seed: int) -> None:
    rng = random.Random(seed)
    src, dst = make_pool(20, seed), make_pool(30, seed + 100)
    before = pages(dst, range(dst.num_blocks))
    n = 7
    src_ids = rng.sample(range(src.num_blocks), n)
    dst_ids = rng.sample(range(dst.num_blocks), n)
    ids, targets = np.asarray(src_ids), np.asarray(dst_ids)
    # Layer by layer (the data plane): gather -> scatter; in-place views are the same bytes.
    for layer in range(4):
        buf = src.host_buffer(src.payload_bytes(n, layer))
        src.gather(layer, ids, buf)
        views = src.views(layer, ids)
        assert views is not None and b"".join(views) == buf.numpy().tobytes()
        dst.scatter(layer, targets, buf, None)
    assert_moved(src, src_ids, dst, before, dst_ids)
    # Whole blocks (the tiers): read -> write elsewhere; block i's layers one after another.
    whole = src.host_buffer(n * src.block_bytes)
    src.read_blocks(ids, whole)
    rows = whole.numpy().reshape(n, -1)
    for layer, offset in enumerate(src.layout.layer_offsets):
        size = src.layout.layer_bytes(layer)
        expect = src.pages[layer].view(torch.uint8)[:, src_ids].transpose(0, 1).reshape(n, size)
        assert np.array_equal(rows[:, offset : offset + size], expect.numpy())
    again = rng.sample(range(dst.num_blocks), n)
    before = pages(dst, range(dst.num_blocks))
    dst.write_blocks(np.asarray(again), whole, None)
    assert_moved(src, src_ids, dst, before, again)


# ------------------------------------------------------------------------- data plane


@contextlib.asynccontextmanager
async def pair(
    src: LayerPoolBlocks, dst: LayerPoolBlocks, backend: str, **kw: object
) -> AsyncIterator[tuple[KVReceiver, KVSender]]:
    receiver = KVReceiver(dst, **kw)  # type: ignore[arg-type]
    await receiver.start()
    sender = KVSender(src, prefer=[backend])
    try:
        yield receiver, sender
    finally:
        await sender.close()
        await receiver.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slot_bytes", [3 * 512, 300])
async def test_transfer_arrives_bit_exact_and_nothing_else_changes(backend: str, slot_bytes: int) -> None:
    rng = random.Random(3)
    src, dst = make_pool(30, 1), make_pool(40, 2)
    assert src.max_layer_bytes == 512  # the fp32 layer's
    before = pages(dst, range(dst.num_blocks))
    n = 13
    src_ids, dst_ids = rng.sample(range(src.num_blocks), n), rng.sample(range(dst.num_blocks), n)
    # Frames of 3 blocks of the largest layer (one frame size for all: the smaller
    # layers' frames are smaller) and a 2-slot shm ring: many frames of every size,
    # slots reused. 300 bytes: an shm slot must still hold one block of the largest layer.
    async with pair(src, dst, backend, shm_slots=2, shm_slot_bytes=slot_bytes) as (receiver, sender):
        sender.max_frame_bytes = 3 * src.max_layer_bytes
        incoming = receiver.expect("t", dst_ids, lease_s=10)
        out = await sender.open(receiver.endpoint, "t", n, timeout_s=10, token=incoming.token)
        assert out.backend == backend
        for start in range(0, n, 5):  # as prefill chunks send them
            await out.send(src_ids[start : start + 5], start)
        sent = await out.finish()
        got = await incoming.wait()
    assert sent.nbytes == got.nbytes == n * src.block_bytes
    assert_moved(src, src_ids, dst, before, dst_ids)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_other_per_layer_formats_are_refused_naming_them(backend: str) -> None:
    # Same namespace on purpose: the per-layer formats alone must refuse it.
    src, dst = make_pool(4, 1), make_pool(4, 2, formats=("int8", "bfloat16", "fp8", "float32"))
    async with pair(src, dst, backend) as (receiver, sender):
        incoming = receiver.expect("t", [0], lease_s=10)
        with pytest.raises(TransferRefused) as info:
            await sender.open(receiver.endpoint, "t", 1, timeout_s=10, token=incoming.token)
    message = str(info.value)
    assert "layer_formats: sender=fp8,bfloat16,int8,float32 receiver=int8,bfloat16,fp8,float32" in message
    assert "--kv-cache-plan" in message
    assert torch.equal(
        dst.pages[0].view(torch.uint8), make_pool(4, 2, dst.layout.layer_formats).pages[0].view(torch.uint8)
    )


async def test_a_mixed_pool_and_a_uniform_pool_never_exchange_blocks() -> None:
    src = make_pool(4, 1, formats=("fp8", "fp8", "int8", "int8"))
    dst = torch.zeros(4, 2, 5, 4, 2, 12, dtype=torch.uint8)  # a uniform fp8 pool of the same shape
    receiver = KVReceiver(dst, KVLayout.of(dst, NS), backends=["tcp"])
    await receiver.start()
    sender = KVSender(src, prefer=["tcp"])
    try:
        incoming = receiver.expect("t", [0], lease_s=10)
        with pytest.raises(
            TransferRefused, match="layer_formats: sender=fp8,fp8,int8,int8 receiver=\\(uniform\\)"
        ):
            await sender.open(receiver.endpoint, "t", 1, timeout_s=10, token=incoming.token)
    finally:
        await sender.close()
        await receiver.close()
    assert not dst.any()


async def test_a_frame_naming_a_layer_past_the_pool_is_refused() -> None:
    """Payload sizes differ by layer, so the layer is checked before the size."""
    dst = make_pool(4, 2)
    before = pages(dst, range(dst.num_blocks))
    receiver = KVReceiver(dst, backends=["tcp"])
    await receiver.start()
    try:
        incoming = receiver.expect("t", [1], lease_s=10)
        lay = dst.layout
        conn = await FrameConn.connect(receiver.endpoint.host, receiver.endpoint.port)
        try:
            await conn.send(Hello(
                PROTOCOL_VERSION, "tcp", receiver.endpoint.host_id, lay.namespace, lay.num_layers, lay.block_size,
                lay.num_kv_heads, lay.head_dim, lay.dtype, 1 << 20, "t", incoming.token, list(lay.layer_formats),
            ))  # fmt: skip
            assert isinstance((await conn.recv_frame())[0], Welcome)
            await conn.send(Open("t", 1, incoming.token))
            assert isinstance((await conn.recv_frame())[0], Opened)
            payload = bytes(lay.layer_bytes(0))
            await conn.send(TcpBlocks("t", 1, 4, 0, 1, 0), [memoryview(payload)])
            reply, _ = await asyncio.wait_for(conn.recv_frame(), 10)
        finally:
            conn.release()
        assert isinstance(reply, Error) and "layers [4, 5) outside [0, 4)" in reply.message
        with pytest.raises(TransferRefused, match="outside"):
            await incoming.wait()
    finally:
        await receiver.close()
    assert all(torch.equal(a, b) for a, b in zip(pages(dst, range(dst.num_blocks)), before, strict=True))


def _handle(shared: torch.Tensor, offsets: list[int], num_blocks: int) -> IpcPoolHandle:
    """What `share_pool` would put on the wire, minus the CUDA handles (not used here)."""
    return IpcPoolHandle(
        device=0, handle=b"", storage_bytes=shared.numel() * shared.element_size(), storage_offset_bytes=0,
        ref_counter_handle=b"", ref_counter_offset=0, event_handle=b"", event_sync_required=False,
        shape=list(shared.shape), stride=list(shared.stride()), offset=0, dtype=str(shared.dtype)[6:],
        layer_offsets=offsets, num_blocks=num_blocks,
    )  # fmt: skip


def test_cuda_ipc_views_the_receivers_layer_pages_in_its_shared_buffer() -> None:
    """cuda_ipc's tensor logic, on CPU tensors: the receiver shares its pool's one buffer
    with each layer's offset, and the sender finds the receiver's layer pages there (its
    own pages' shapes, the receiver's block count); anything else is BackendUnavailable."""
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", family="llama", hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=64, vocab_size=100, max_position_embeddings=512, rms_norm_eps=1e-6,
    )  # fmt: skip
    spec = KVCacheSpec.resolve(3, torch.bfloat16, plan=["fp8", "auto", "int8"])
    receiver = pool_blocks(KVPool(cfg, 9, 4, torch.bfloat16, "cpu", spec=spec), NS)
    sender = pool_blocks(KVPool(cfg, 5, 4, torch.bfloat16, "cpu", spec=spec), NS)
    assert isinstance(receiver, LayerPoolBlocks) and isinstance(sender, LayerPoolBlocks)
    shared, offsets = receiver.ipc_tensor()
    assert offsets[0] == 0 and all(off % 256 == 0 for off in offsets)  # KVPool's aligned regions
    pages, num_blocks = remote_pages(shared, _handle(shared, offsets, receiver.num_blocks), sender)
    assert num_blocks == 10
    for mine, theirs in zip(pages, receiver.pages, strict=True):
        assert (
            mine.data_ptr() == theirs.data_ptr() and mine.shape == theirs.shape and mine.dtype == theirs.dtype
        )
    with pytest.raises(BackendUnavailable, match="outside its buffer"):
        remote_pages(shared, _handle(shared, offsets, receiver.num_blocks + 1), sender)
    with pytest.raises(BackendUnavailable, match="mixed pool's layer pages"):
        remote_pages(shared, _handle(shared, [], 0), sender)  # a pool tensor's handle
    # A uniform pool's tensor: one tensor, its layers the pages, as before.
    kv = torch.zeros(3, 2, 7, 4, 2, 12, dtype=torch.uint8)
    uniform = PoolBlocks(torch.zeros(3, 2, 5, 4, 2, 12, dtype=torch.uint8), KVLayout.of(kv, NS))
    pages, num_blocks = remote_pages(kv, _handle(kv, [], 0), uniform)
    assert num_blocks == 7 and [p.data_ptr() for p in pages] == [kv[i].data_ptr() for i in range(3)]
    with pytest.raises(BackendUnavailable, match="does not match"):
        remote_pages(kv[:2], _handle(kv[:2], [], 0), uniform)
