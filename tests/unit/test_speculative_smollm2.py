"""Speculative decoding on the embedded SmolLM2-135M-Instruct (real weights): greedy
outputs equal to speculation off, token for token, for both proposers, in a mixed
batch with shared prefixes, chunked prefill and forced preemption; and drafts are
really accepted (the model copies text it was shown)."""

from __future__ import annotations

import pytest

from rtpllm.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant. Answer briefly and copy text exactly when asked."
CODE = "def add(a, b):\n    retrun a + b\n\nprint(add(2, 3))\n"
TASKS = [
    f"Fix the typo in this Python code and show the whole corrected code:\n{CODE}",
    "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the river bank.",
    "What is the capital of France?",
    f"Rename the function add to plus in this code and show the code:\n{CODE}",
]


def run(method: str | None, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[dict[str, list[int]], LLMEngine]:
    eng = LLMEngine(
        EngineConfig(
            model="smollm2-135m-instruct",
            # A small pool forces preemption; a small token budget chunks the prefills.
            cache=CacheConfig(num_blocks=14),
            scheduler=SchedulerConfig(max_num_batched_tokens=96),
            speculative=SpeculativeConfig(method=method, num_speculative_tokens=5, adaptive=False),
        )
    )
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(f"r{i}", prompt, p)
    out: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return out, eng


@pytest.fixture(scope="module")
def batch() -> tuple[list[list[int]], list[SamplingParams]]:
    from rtpllm.models.registry import resolve_model
    from rtpllm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(resolve_model("smollm2-135m-instruct"))
    prompts = [tok.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}]) for t in TASKS]
    params = [SamplingParams(temperature=0, max_tokens=m, output_kind="final") for m in (48, 32, 16, 48)]
    return prompts, params


@pytest.fixture(scope="module")
def base(batch: tuple[list[list[int]], list[SamplingParams]]) -> dict[str, list[int]]:
    out, eng = run(None, *batch)
    assert eng.preemptions_total > 0
    return out


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_greedy_equals_speculation_off_on_smollm2(
    batch: tuple[list[list[int]], list[SamplingParams]], base: dict[str, list[int]], method: str
) -> None:
    prompts, params = batch
    spec, eng = run(method, prompts, params)
    assert spec == base
    c = eng.speculator.counters  # type: ignore[union-attr]
    assert c.accepted_tokens > 20, c  # it copies the code and the sentence
    assert eng.preemptions_total > 0
    assert eng.block_manager.stats.hit_tokens > 0  # the shared system prompt
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
