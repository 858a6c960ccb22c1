"""Disaggregation at the engine level: a prefill-only request on one engine hands its
KV and first token to a reserved request on another; greedy outputs equal one engine
doing both. The KV is copied by tensor indexing here (the data plane has its own tests),
except for a mixed per-layer KV plan, whose layer pages go over the data plane."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest

from rtpllm import LLM, SamplingParams
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.outputs import KVReservation, RequestOutput
from rtpllm.transfer import KVReceiver, KVSender
from rtpllm.transfer.blocks import KVBlocks
from rtpllm.transfer.endpoint import shm_available


def make_engine(ckpt: Path, **kw) -> LLMEngine:
    opts = dict(device="cpu", block_size=8, max_num_batched_tokens=24, num_blocks=64)
    opts.update(kw)
    return LLM(str(ckpt), **opts).engine


def drain(engine: LLMEngine, rid: str) -> list[RequestOutput]:
    outs: list[RequestOutput] = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def prefill_remote(prefill: LLMEngine, rid: str, prompt: list[int], params: SamplingParams, res: KVReservation) -> RequestOutput:
    """Run the prefill, copying KV into the decode pool chunk by chunk as it is reported."""
    prefill.add_request(rid, prompt, params, prefill_only=True)
    shipped = res.skip_blocks
    last = None
    chunks = 0
    for out in drain(prefill, rid):
        assert out.kv is not None
        full = len(out.kv.block_ids) if out.finished else out.kv.num_tokens // prefill.block_manager.block_size
        if full > shipped:
            chunks += 1
            shipped = full
        last = out
    assert last is not None and last.finished and last.outputs[0].finish_reason == "handoff"
    assert chunks >= 1
    return last


@pytest.mark.parametrize("length", [5, 8, 23, 40, 61])
def test_handoff_equals_one_engine(tiny_llama: Path, length: int) -> None:
    rng = random.Random(length)
    prompt = [rng.randrange(1, 300) for _ in range(length)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = LLM(str(tiny_llama), device="cpu", block_size=8, max_num_batched_tokens=24).generate([prompt], params)[0]

    prefill, decode = make_engine(tiny_llama), make_engine(tiny_llama)
    res = decode.add_request("r", prompt, params, remote_prefill_min_tokens=1)
    assert res is not None and res.skip_blocks == 0 and len(res.block_ids) == -(-length // 8)
    assert not decode.has_unfinished_requests(), "a request awaiting KV is not work for the step loop"
    assert decode.stats().num_awaiting_kv == 1

    last = prefill_remote(prefill, "r", prompt, params, res)
    assert last.kv is not None and last.kv.num_tokens == length
    src = last.kv.block_ids[res.skip_blocks :]
    decode.kv_pool.kv[:, :, res.block_ids] = prefill.kv_pool.kv[:, :, src]
    assert prefill.stats().num_held_kv == 1
    assert prefill.release_kv("r") and not prefill.release_kv("r")
    prefill.block_manager.check_invariants(set())
    assert prefill.block_manager.num_free_blocks == prefill.block_manager.num_blocks

    first = last.outputs[0].token_ids
    assert first == want.outputs[0].token_ids[:1]
    assert decode.complete_remote_prefill("r", first[0], None, num_cached_tokens=0)
    outs = drain(decode, "r")
    tokens = [t for o in outs for t in o.outputs[0].token_ids]
    text = "".join(o.outputs[0].text for o in outs)
    assert tokens == want.outputs[0].token_ids
    assert text == want.outputs[0].text
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    decode.block_manager.check_invariants(set())
    assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks


def test_decode_prefix_hit_skips_blocks_and_short_prompts_stay_local(tiny_llama: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    decode = make_engine(tiny_llama)
    shared = list(range(1, 33))  # 4 full blocks
    decode.add_request("warm", shared + [40], params)
    drain(decode, "warm")
    res = decode.add_request("r", shared + list(range(50, 70)), params, remote_prefill_min_tokens=8)
    assert res is not None and res.skip_blocks == 4 and res.num_cached_tokens == 32
    # Only 5 uncached tokens: below the threshold, so it is queued locally.
    assert decode.add_request("short", shared + [1, 2, 3, 4, 5], params, remote_prefill_min_tokens=8) is None
    assert decode.has_unfinished_requests()
    decode.abort_request("r")
    drain(decode, "short")
    decode.block_manager.check_invariants(set())
    assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks


@pytest.mark.parametrize("token_known", [False, True])
def test_failed_remote_prefill_falls_back_to_local(tiny_llama: Path, token_known: bool) -> None:
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = LLM(str(tiny_llama), device="cpu", block_size=8).generate([prompt], params)[0].outputs[0].token_ids
    decode = make_engine(tiny_llama)
    res = decode.add_request("r", prompt, params, remote_prefill_min_tokens=1)
    assert res is not None
    decode.kv_pool.kv[:, :, res.block_ids] = 7.0  # a half-done transfer left garbage behind
    assert decode.fail_remote_prefill("r", want[0] if token_known else None)
    outs = drain(decode, "r")
    assert [t for o in outs for t in o.outputs[0].token_ids] == want
    decode.block_manager.check_invariants(set())
    assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks


def test_first_token_that_ends_the_request(tiny_llama: Path) -> None:
    prompt = list(range(3, 20))
    decode = make_engine(tiny_llama)
    params = SamplingParams(temperature=0, max_tokens=1)
    res = decode.add_request("r", prompt, params, remote_prefill_min_tokens=1)
    assert res is not None
    assert decode.complete_remote_prefill("r", 5, None)
    outs = drain(decode, "r")
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == [5]
    assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks


def test_abort_while_awaiting_kv_and_stale_calls(tiny_llama: Path) -> None:
    decode = make_engine(tiny_llama)
    params = SamplingParams(temperature=0, max_tokens=4)
    assert decode.add_request("r", list(range(1, 30)), params, remote_prefill_min_tokens=1) is not None
    assert decode.abort_request("r")
    assert not decode.complete_remote_prefill("r", 1) and not decode.fail_remote_prefill("r")
    for out in decode.step():
        assert out.finished
    decode.block_manager.check_invariants(set())
    assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks


def test_prefill_only_refuses_n_above_one(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama)
    with pytest.raises(ValueError, match="n=1"):
        engine.add_request("r", [1, 2, 3], SamplingParams(n=2), prefill_only=True)


async def _ship(src: KVBlocks, src_ids: list[int], dst: KVBlocks, dst_ids: list[int], backend: str) -> None:
    """The prefill's blocks `src_ids` into the decode's `dst_ids` over the data plane."""
    receiver = KVReceiver(dst, backends=[backend])
    await receiver.start()
    sender = KVSender(src, prefer=[backend])
    try:
        incoming = receiver.expect("r", dst_ids, lease_s=10)
        out = await sender.open(receiver.endpoint, "r", len(dst_ids), 10, token=incoming.token)
        assert out.backend == backend
        await out.send(np.asarray(src_ids), 0)
        await out.finish()
        await incoming.wait()
    finally:
        await sender.close()
        await receiver.close()


def _whole(blocks: KVBlocks, ids: list[int]) -> bytes:
    out = blocks.host_buffer(len(ids) * blocks.block_bytes)
    blocks.read_blocks(np.asarray(ids), out)
    return out.numpy().tobytes()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["tcp", "shm"] if shm_available() else ["tcp"])
def test_handoff_of_a_mixed_kv_plan_over_the_data_plane(tiny_llama: Path, backend: str) -> None:
    """A mixed per-layer KV plan (layer 0 fp8, layer 1 in the model's dtype) on both
    sides: the prefill's layer pages reach the decode's reserved blocks over the data
    plane bit for bit, and the decode continues as one engine would."""
    plan = {"kv_cache_dtype": "fp8", "kv_cache_dtype_skip_layers": (1,)}
    prompt = [random.Random(7).randrange(1, 300) for _ in range(40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = LLM(str(tiny_llama), device="cpu", block_size=8, max_num_batched_tokens=24, **plan).generate([prompt], params)[0]  # type: ignore[arg-type]
    prefill, decode = make_engine(tiny_llama, **plan), make_engine(tiny_llama, **plan)
    assert prefill.kv_pool.kv is None and prefill.kv_pool.spec.formats == ("fp8", "float32")
    res = decode.add_request("r", prompt, params, remote_prefill_min_tokens=1)
    assert res is not None
    last = prefill_remote(prefill, "r", prompt, params, res)
    assert last.kv is not None
    src = list(last.kv.block_ids[res.skip_blocks :])
    asyncio.run(_ship(prefill.kv_blocks(), src, decode.kv_blocks(), list(res.block_ids), backend))
    assert _whole(decode.kv_blocks(), list(res.block_ids)) == _whole(prefill.kv_blocks(), src)
    first = last.outputs[0].token_ids
    assert decode.complete_remote_prefill("r", first[0], None, num_cached_tokens=0)
    tokens = [t for o in drain(decode, "r") for t in o.outputs[0].token_ids]
    assert tokens == want.outputs[0].token_ids
