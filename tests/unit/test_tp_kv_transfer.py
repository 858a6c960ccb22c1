"""PD transfers of tensor-parallel engines on the CPU (gloo, worker processes): a TP=N
engine's KV pool, seen by the data plane as whole blocks (engine/sharded_blocks.py),
reads and writes every rank's KV heads through rank 0 over the KV group.

Per case (TP=2; TP=4 over 2 KV heads, each head on two ranks; TP=2 with int8 KV) one
TP=1 and one TP=N engine of the same checkpoint:
- the KV a prefill-only request leaves in the TP=N pool, gathered, is the TP=1 pool's
  (fp32 within 1e-5 relative; int8 within one quantization step, scales within 1e-5);
- a random payload scattered into free blocks gathers back bit for bit, and each rank's
  pool holds its own heads of it;
- through the real data plane (tcp and shm, KVSender/KVReceiver), TP=1 prefill -> TP=N
  decode and TP=N prefill -> TP=1 decode give the greedy tokens of TP=1 alone.
The byte layouts of a TP=1 and a TP=N block are the same; only the block-key namespace
tells them apart (it names the TP size), so the TP=1 side borrows the TP=N namespace here.
test_tp_failures.py kills a rank during transfers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from rtpllm import LLM, SamplingParams
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.engine.sharded_blocks import ShardedPoolBlocks
from rtpllm.transfer import KVLayout, KVReceiver, KVSender
from rtpllm.transfer.blocks import KVBlocks, PoolBlocks
from rtpllm.transfer.endpoint import shm_available
from tests.unit.test_tensor_parallel import live, one_thread_per_rank, prompts_of  # noqa: F401

pytestmark = pytest.mark.timeout(120)

ENGINE = {"device": "cpu", "block_size": 8, "num_blocks": 32, "max_model_len": 128, "max_num_batched_tokens": 32}
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, output_kind="final")
BACKENDS = ["tcp", "shm"] if shm_available() else ["tcp"]
# (TP size, --kv-cache-dtype)
CASES = {"tp2": (2, "auto"), "tp4-replicated": (4, "auto"), "tp2-int8": (2, "int8")}


class Pair:
    """A TP=1 and a TP=N engine of one checkpoint and KV format."""

    def __init__(self, model_dir: Path, size: int, kv_dtype: str) -> None:
        self.one = LLM(str(model_dir), kv_cache_dtype=kv_dtype, **ENGINE)  # type: ignore[arg-type]
        self.many = LLM(str(model_dir), tensor_parallel_size=size, kv_cache_dtype=kv_dtype, **ENGINE)  # type: ignore[arg-type]
        self.quantized = kv_dtype != "auto"
        blocks = self.many.engine.kv_blocks()
        assert isinstance(blocks, ShardedPoolBlocks) and not blocks.direct
        self.sharded = blocks
        kv = self.one.engine.kv_pool.kv
        assert kv is not None
        # The same bytes per block; the TP=1 side takes the TP=N namespace (see the module doc).
        self.plain = PoolBlocks(kv, KVLayout.of(kv, blocks.layout.namespace))
        assert self.plain.layout == blocks.layout

    def reset(self) -> None:
        for llm in (self.one, self.many):
            llm.engine.block_manager.reset_prefix_cache()

    def close(self) -> None:
        self.many.close()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tiny_llama: Path) -> Iterator[Pair]:
    size, kv_dtype = CASES[request.param]
    pair = Pair(tiny_llama, size, kv_dtype)
    yield pair
    pids = pair.many.engine.tp.workers.pids  # type: ignore[union-attr]
    pair.close()
    assert not live(pids)


def drain(engine: LLMEngine, rid: str) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def prefill_only(engine: LLMEngine, rid: str, prompt: list[int]) -> tuple[list[int], int]:
    """Prefill `prompt` as a prefill instance does: (the prompt's held blocks, first token)."""
    engine.add_request(rid, prompt, GREEDY, prefill_only=True)
    last = drain(engine, rid)[-1]
    assert last.finished and last.outputs[0].finish_reason == "handoff" and last.kv is not None
    blocks = -(-len(prompt) // engine.block_manager.block_size)
    return last.kv.block_ids[:blocks], last.outputs[0].token_ids[0]


def payload(blocks: KVBlocks, layer: int, ids: list[int]) -> torch.Tensor:
    """Blocks `ids` of `layer`, gathered: [2, n, block_size, all KV heads, row]."""
    lay = blocks.layout
    out = blocks.host_buffer(blocks.payload_bytes(len(ids), layer))
    blocks.gather(layer, np.asarray(ids, dtype=np.int64), out)
    return out.view(lay.torch_dtype).view(2, len(ids), lay.block_size, lay.num_kv_heads, lay.head_dim).clone()


def split_quantized(t: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values [.., heads, head_dim] and fp32 scales [.., heads] of quantized pages."""
    two, n, bs, heads, _ = t.shape
    pages = t.reshape(two, n, -1)
    split = bs * heads * head_dim
    values = pages[..., :split].reshape(two, n, bs, heads, head_dim).view(torch.int8)
    scales = pages[..., split:].reshape(two, n, bs, heads, 4).view(torch.float32).squeeze(-1)
    return values, scales


def head_parts(pair: Pair, t: torch.Tensor) -> list[torch.Tensor]:
    """`t` [2, n, block_size, heads, row] as views whose dim -2 slices are whole heads."""
    if not pair.quantized:
        return [t]
    values, scales = split_quantized(t, pair.one.engine.model_config.head_dim)
    return [values, scales.unsqueeze(-1)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (random payloads hold NaNs, which are never equal as floats)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_prefilled_kv_gathers_to_the_unsharded_pool(pair: Pair) -> None:
    pair.reset()
    prompt = prompts_of(1, 45, seed=11)[0]  # two chunks, a partial last block
    ids_one, first_one = prefill_only(pair.one.engine, "p", prompt)
    ids_many, first_many = prefill_only(pair.many.engine, "p", prompt)
    assert first_one == first_many
    head_dim = pair.one.engine.model_config.head_dim
    for layer in range(pair.sharded.layout.num_layers):
        want = payload(pair.plain, layer, ids_one)
        got = payload(pair.sharded, layer, ids_many)
        if not pair.quantized:
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 1e-5, f"layer {layer}: relative error {err:.2e}"
            continue
        (v_got, s_got), (v_want, s_want) = split_quantized(got, head_dim), split_quantized(want, head_dim)
        assert ((s_got - s_want).abs() <= 1e-5 * s_want.abs()).all(), f"layer {layer}: scales differ"
        # Values may round to the neighbouring step where the unquantized KV differs by ~1e-7.
        step = (v_got.int() - v_want.int()).abs()
        assert step.max() <= 1 and (step > 0).float().mean() < 0.01, f"layer {layer}: values differ"
    for llm in (pair.one, pair.many):
        assert llm.engine.release_kv("p")


def test_scatter_then_gather_round_trips_and_lands_each_rank_its_heads(pair: Pair) -> None:
    pair.reset()  # the blocks below are free: no cached prefix points at them
    engine, lay = pair.many.engine, pair.sharded.layout
    ids = [7, 3, 20, 21, 30]
    g = torch.Generator().manual_seed(5)
    for layer in range(lay.num_layers):
        src = torch.randint(0, 256, (pair.sharded.payload_bytes(len(ids), layer),), dtype=torch.uint8, generator=g)
        before = engine.kv_pool.kv.clone()  # type: ignore[union-attr]
        pair.sharded.scatter(layer, np.asarray(ids), src, None)
        got = torch.empty_like(src)
        pair.sharded.gather(layer, np.asarray(ids), got)
        assert torch.equal(got, src), f"layer {layer}: the payload did not come back"
        # Rank 0's own pool holds exactly its heads of the payload; nothing else changed.
        local = engine.kv_pool.kv  # type: ignore[union-attr]
        heads = local.shape[-2]
        whole = src.view(lay.torch_dtype).view(2, len(ids), lay.block_size, lay.num_kv_heads, lay.head_dim)
        for w, m in zip(head_parts(pair, whole), head_parts(pair, local[layer][:, ids]), strict=True):
            assert same_bits(m, w[..., :heads, :])
        before[layer][:, ids] = local[layer][:, ids]
        assert same_bits(local, before), "blocks outside the targets changed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_plane_between_tp1_and_tpn_decodes_like_tp1(pair: Pair, backend: str) -> None:
    prompt = prompts_of(1, 45, seed=12)[0]
    pair.reset()
    want = pair.one.generate([prompt], GREEDY)[0].outputs[0].token_ids
    for src, dst in ((pair.one, pair.many), (pair.many, pair.one)):
        pair.reset()
        src_blocks = pair.plain if src is pair.one else pair.sharded
        dst_blocks = pair.sharded if dst is pair.many else pair.plain
        ids, first = prefill_only(src.engine, "h", prompt)
        res = dst.engine.add_request("h", prompt, GREEDY, remote_prefill_min_tokens=1)
        assert res is not None and res.skip_blocks == 0 and len(res.block_ids) == len(ids)
        asyncio.run(ship(src_blocks, ids, dst_blocks, res.block_ids, backend))
        assert src.engine.release_kv("h")
        assert dst.engine.complete_remote_prefill("h", first)
        tokens = [t for out in drain(dst.engine, "h") for t in out.outputs[0].token_ids]
        assert tokens == want, f"{'TP=1 -> TP=N' if src is pair.one else 'TP=N -> TP=1'} over {backend}"
        assert dst.engine.block_manager.num_free_blocks == dst.engine.block_manager.num_blocks


async def ship(src: KVBlocks, src_ids: list[int], dst: KVBlocks, dst_ids: list[int], backend: str) -> None:
    """One transfer of blocks `src_ids` into `dst_ids`, as a prefill and a decode instance run it."""
    receiver = KVReceiver(dst, backends=[backend])
    await receiver.start()
    sender = KVSender(src, prefer=[backend], max_frame_bytes=src.layout.block_layer_bytes * 2)  # several frames per layer
    try:
        incoming = receiver.expect("t", dst_ids, lease_s=30)
        out = await sender.open(receiver.endpoint, "t", len(dst_ids), 30, token=incoming.token)
        await out.send(np.asarray(src_ids[:3]), 0)  # as prefill chunks do
        await out.send(np.asarray(src_ids[3:]), 3)
        stats = await out.finish()
        await incoming.wait()
        assert stats.backend == backend and stats.nbytes == len(src_ids) * src.block_bytes
    finally:
        await sender.close()
        await receiver.close()


def test_cuda_ipc_is_never_offered_for_a_sharded_pool(pair: Pair) -> None:
    receiver = KVReceiver(pair.sharded)
    assert "cuda_ipc" not in receiver.backends
    with pytest.raises(ValueError, match="does not apply"):
        KVReceiver(pair.sharded, backends=["cuda_ipc"])
