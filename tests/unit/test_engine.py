"""Engine behaviour through its public faces (LLM, LLMEngine.step): invariants,
seeds, stop strings, n > 1, logprobs, limits and validation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rtpllm import LLM, SamplingParams
from rtpllm.config import SpeculativeConfig
from rtpllm.outputs import RequestOutput


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> LLM:
    return LLM(str(tiny_llama), device="cpu", max_num_batched_tokens=64)


def text_of(out: RequestOutput, i: int = 0) -> str:
    return out.outputs[i].text


def test_blocks_all_free_after_mixed_finish_abort_preempt(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), device="cpu", num_blocks=10, block_size=8, max_model_len=64, max_num_batched_tokens=32)
    eng = llm.engine
    rng = random.Random(0)
    live: set[str] = set()
    for i in range(40):
        rid = f"r{i}"
        prompt = [rng.randrange(300) for _ in range(rng.randint(1, 30))]
        params = SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 25), ignore_eos=True)
        eng.add_request(rid, prompt, params)
        live.add(rid)
        for _ in range(rng.randint(0, 3)):
            for out in eng.step():
                if out.finished:
                    live.discard(out.request_id)
        if live and rng.random() < 0.3:
            victim = rng.choice(sorted(live))
            assert eng.abort_request(victim)
            live.discard(victim)
        eng.block_manager.check_invariants({r.request_id for r in eng._requests.values()})
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                live.discard(out.request_id)
    assert not live
    assert eng.stats().num_preemptions > 0, "the pool is meant to be too small"
    eng.block_manager.check_invariants(set())
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_same_seed_same_text_whatever_the_batch(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([[1, 2, 3]], params)[0].outputs[0].token_ids
    crowd = llm.generate(
        [[9, 9], [1, 2, 3], list(range(50))],
        [SamplingParams(temperature=1.0, max_tokens=30), params, SamplingParams(temperature=0.7, max_tokens=5)],
    )
    assert crowd[1].outputs[0].token_ids == alone
    other = llm.generate([[1, 2, 3]], SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=20, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone


def _ascii_run(text: str) -> tuple[int, str] | None:
    for i in range(2, len(text) - 3):
        piece = text[i : i + 2]
        if piece.isascii() and piece.isprintable() and text.find(piece) == i:
            return i, piece
    return None


def test_stop_string_ends_text_exactly_before_it(llm: LLM) -> None:
    prompt = list(range(40, 60))
    full = text_of(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0])
    found = _ascii_run(full)
    assert found, f"no ascii stop candidate in {full!r}"
    idx, stop = found
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.text == full[:idx]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    )[0].outputs[0]
    assert kept.text == full[: idx + len(stop)]


def test_streamed_deltas_never_show_part_of_a_stop_string(llm: LLM) -> None:
    prompt = list(range(40, 60))
    full = text_of(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0])
    found = _ascii_run(full)
    assert found
    idx, stop = found
    eng = llm.engine
    eng.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))
    streamed = ""
    while eng.has_unfinished_requests():
        for out in eng.step():
            delta = out.outputs[0].text
            streamed += delta
            assert stop[0] not in streamed[idx:], "the stop string's start leaked into the stream"
    assert streamed == full[:idx]


def test_streamed_text_adds_up_to_the_decoded_tokens(llm: LLM) -> None:
    # Random weights emit arbitrary bytes; whatever they are, the deltas must add up.
    tok = llm.get_tokenizer()
    assert tok is not None
    eng = llm.engine
    eng.add_request("u", "héllo ✓ 日本", SamplingParams(temperature=1.0, seed=3, max_tokens=60, ignore_eos=True))
    chunks: list[str] = []
    ids: list[int] = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            chunks.append(out.outputs[0].text)
            ids.extend(out.outputs[0].token_ids)
    assert "".join(chunks) == tok.decode(ids)


def test_n_samples_share_prompt_blocks(llm: LLM) -> None:
    prompt = list(range(100, 164))  # 4 full blocks
    before = llm.engine.block_manager.stats.hit_tokens
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1, "samples should differ"
    # Samples 1 and 2 found the first sample's prompt blocks (all but the last block).
    assert llm.engine.block_manager.stats.hit_tokens - before >= 2 * 48
    again = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


def test_logprobs_are_log_softmax_of_the_model(llm: LLM, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    prompt = [5, 6, 7, 8]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True))[0]
    comp = out.outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + comp.token_ids])).logits[0].log_softmax(-1)
    assert comp.logprobs is not None and len(comp.logprobs) == 5
    total = 0.0
    for step, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + step]
        assert lp[tok].rank == 1  # greedy picks the top token
        assert abs(lp[tok].logprob - row[tok].item()) < 1e-4
        top = row.topk(3)
        assert sorted(lp) == sorted(set(top.indices.tolist()) | {tok})
        total += lp[tok].logprob
    assert comp.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry is not None
        assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4


def test_min_tokens_blocks_eos_and_stop_ids(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), device="cpu")
    prompt = [1, 2, 3]
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0].outputs[0].token_ids[0]
    stopped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[first]))[0].outputs[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.stop_reason == first
    held = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, min_tokens=4, stop_token_ids=[first]))[0]
    assert held.outputs[0].token_ids[0] != first
    assert len(held.outputs[0].token_ids) >= 4


def test_output_is_capped_by_the_context_window(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), device="cpu", max_model_len=40)
    out = llm.generate([list(range(30))], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [([], "empty"), ([1, 10_000], "outside the vocabulary"), ([7] * 2000, "context length")],
)
def test_bad_prompts_are_rejected_clearly(llm: LLM, prompt: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], SamplingParams(max_tokens=1))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"n": 0}, {"max_tokens": 0}, {"min_p": 2},
     {"presence_penalty": 3}, {"repetition_penalty": 0}, {"logprobs": 21}, {"stop": [""]}, {"min_tokens": 5, "max_tokens": 2}],
)
def test_bad_sampling_params_name_the_field(kwargs: dict) -> None:
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=field if field != "stop" else "stop strings"):
        SamplingParams(**kwargs)


def test_duplicate_request_id_is_refused(llm: LLM) -> None:
    eng = llm.engine
    eng.add_request("dup", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("dup", [1, 2], SamplingParams(max_tokens=2))
    eng.abort_request("dup")
    outs = eng.step()
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    assert not eng.has_unfinished_requests()


async def test_async_engine_streams_end_on_shutdown(tiny_llama: Path) -> None:
    from rtpllm.config import EngineConfig
    from rtpllm.engine.async_engine import AsyncLLMEngine, EngineDeadError

    eng = await AsyncLLMEngine.create(EngineConfig(model=str(tiny_llama)))
    stream = eng.generate("long", [1, 2, 3], SamplingParams(max_tokens=100_000, ignore_eos=True))
    first = await stream.__anext__()
    assert not first.finished
    await eng.shutdown()
    with pytest.raises(EngineDeadError):
        async for _ in stream:
            pass
    with pytest.raises(EngineDeadError):
        async for _ in eng.generate("after", [1], SamplingParams(max_tokens=1)):
            pass


def test_bf16_engine_samples_from_native_logits_as_from_float32(tiny_llama: Path) -> None:
    """The runner hands the sampler bf16 logits (`native_logits`); the outputs of a mixed
    batch (plain greedy, logprobs, penalties, a sampled seeded row, n-gram speculation's
    verify rows) equal those of float32 logits, and the runner did return bf16."""
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11], [12, 13, 14, 15], [3, 4]]
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, seed=7, max_tokens=12, ignore_eos=True),
    ]
    results = []
    for native in (True, False):
        spec = SpeculativeConfig(method="ngram", num_speculative_tokens=3, adaptive=False, ngram_min=1)
        llm = LLM(str(tiny_llama), device="cpu", dtype="bfloat16", speculative=spec)
        llm.engine.runner.native_logits = native
        dtypes: list[torch.dtype] = []
        execute = llm.engine.runner.execute

        def spy(step, prev=None, execute=execute, dtypes=dtypes):  # type: ignore[no-untyped-def]
            out = execute(step, prev)
            dtypes.append(out.logits.dtype)
            return out

        llm.engine.runner.execute = spy  # type: ignore[method-assign]
        outs = llm.generate(prompts, params)
        results.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs])
        assert set(dtypes) == {torch.bfloat16 if native else torch.float32}
        llm.close()
    assert results[0] == results[1]
