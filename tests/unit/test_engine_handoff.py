"""Disaggregation at the engine level: a prefill-only request on one engine hands its
KV and first token to a reserved request on another; greedy outputs equal one engine
doing both. The KV is copied by tensor indexing here (the data plane has its own tests)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from rtpllm import LLM, SamplingParams
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.outputs import KVReservation, RequestOutput


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
