"""Async scheduling (step n+1 launched before step n's tokens are read back) must give
exactly the outputs of synchronous scheduling, in every situation the engine handles."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from rtpllm import LLM, SamplingParams
from tests.unit.test_models_vs_hf import PROMPTS, check_against_hf


def _pair(model_dir: Path, **kw) -> tuple[LLM, LLM]:
    return (
        LLM(str(model_dir), device="cpu", async_scheduling=False, **kw),
        LLM(str(model_dir), device="cpu", async_scheduling=True, **kw),
    )


def _summary(outs) -> list:
    return [[(o.index, o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in r.outputs] for r in outs]


def test_mixed_workload_matches_sync(tiny_llama: Path) -> None:
    sync, asyn = _pair(tiny_llama, num_blocks=14, block_size=8, max_model_len=96, max_num_batched_tokens=24)
    rng = random.Random(1)
    prompts = [[rng.randrange(300) for _ in range(rng.randint(1, 40))] for _ in range(12)]
    params = [
        SamplingParams(
            temperature=rng.choice([0.0, 0.8]),
            seed=rng.randrange(100),
            max_tokens=rng.randint(1, 30),
            n=rng.choice([1, 1, 2]),
            ignore_eos=True,
            logprobs=rng.choice([None, 2]),
            min_tokens=rng.choice([0, 2]),
        )
        for _ in prompts
    ]
    a = sync.generate(prompts, params)
    b = asyn.generate(prompts, params)
    assert _summary(a) == _summary(b)
    assert asyn.engine.stats().num_preemptions > 0
    for r1, r2 in zip(a, b, strict=True):
        for o1, o2 in zip(r1.outputs, r2.outputs, strict=True):
            if o1.logprobs is not None:
                assert [sorted(x) for x in o1.logprobs] == [sorted(x) for x in o2.logprobs]
    asyn.engine.block_manager.check_invariants(set())
    assert asyn.engine.block_manager.num_free_blocks == 14


def test_stop_strings_and_penalties_match_sync(tiny_llama: Path) -> None:
    sync, asyn = _pair(tiny_llama)
    prompt = list(range(40, 60))
    full = sync.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0].text
    stop = next(full[i : i + 2] for i in range(2, len(full) - 3) if full[i : i + 2].isascii() and full[i : i + 2].isprintable())
    params = [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]),
        SamplingParams(temperature=0.9, seed=5, max_tokens=30, ignore_eos=True, repetition_penalty=1.5, presence_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, frequency_penalty=1.0),
    ]
    assert _summary(sync.generate([prompt] * 3, params)) == _summary(asyn.generate([prompt] * 3, params))


def test_abort_while_a_step_is_in_flight(tiny_llama: Path) -> None:
    _, asyn = _pair(tiny_llama)
    eng = asyn.engine
    eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("b", [4, 5, 6], SamplingParams(max_tokens=5, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng._in_flight is not None
    assert eng.abort_request("a")
    finished = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0]
    assert finished["a"].finish_reason == "abort"
    assert finished["b"].finish_reason == "length"
    eng.block_manager.check_invariants(set())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_async_logits_match_hf(family: str, tiny_checkpoints: dict[str, Path]) -> None:
    model_dir = tiny_checkpoints[family]
    llm = LLM(str(model_dir), device="cpu", async_scheduling=True, num_blocks=12, max_model_len=160, max_num_batched_tokens=24)
    check_against_hf(model_dir, llm, PROMPTS)
