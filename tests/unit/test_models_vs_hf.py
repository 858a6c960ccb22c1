"""Every family against HF transformers on the same random weights (fp32, CPU):
prefill and decode logits at every position, and 64 greedy tokens, through the whole
engine (batching, chunked prefill, prefix-cache hits, preemption)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rtpllm import LLM, SamplingParams
from rtpllm.engine.request import Request
from rtpllm.engine.scheduler import SchedulerOutput
from rtpllm.loader.random_checkpoint import write_random_checkpoint
from tests.conftest import FAMILIES

PROMPTS = [
    [5, 17, 42, 99, 7],
    list(range(30, 67)),  # crosses block boundaries (block_size 16)
    [300],
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26],  # exactly one block
]
RTOL = 1e-4


def hf_logits(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    hf = _hf_model(model_dir)
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0].float()


_HF_CACHE: dict[Path, torch.nn.Module] = {}


def _hf_model(model_dir: Path) -> torch.nn.Module:
    if model_dir not in _HF_CACHE:
        _HF_CACHE[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _HF_CACHE[model_dir]


class LogitsRecorder:
    """Collects (request, position, logits row) for every token the engine computes."""

    def __init__(self, llm: LLM) -> None:
        self.rows: list[tuple[Request, int, torch.Tensor]] = []
        llm.engine.runner.logits_observer = self

    def __call__(self, step: SchedulerOutput, logits: torch.Tensor) -> None:
        row = 0
        for item in step.scheduled:
            for pos in range(item.start, item.start + item.num_new_tokens):
                self.rows.append((item.request, pos, logits[row].clone()))
                row += 1


def check_against_hf(model_dir: Path, llm: LLM, prompts: list[list[int]], max_tokens: int = 64) -> dict[str, int]:
    recorder = LogitsRecorder(llm)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    worst = 0.0
    for prompt, out in zip(prompts, outs, strict=True):
        tokens = out.outputs[0].token_ids
        assert len(tokens) == max_tokens
        ref = hf_logits(model_dir, prompt + tokens)
        assert ref[len(prompt) - 1 : -1].argmax(-1).tolist() == tokens, "greedy tokens differ from HF"
    # Every logits row the engine computed, prefill and decode, recomputed or not. HF is
    # causal, so one forward over a request's final tokens gives the reference for all.
    refs: dict[int, torch.Tensor] = {}
    for req, pos, row in recorder.rows:
        if id(req) not in refs:
            refs[id(req)] = hf_logits(model_dir, req.all_token_ids)
        ref = refs[id(req)][pos]
        err = ((row - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        assert err < RTOL, f"position {pos}: relative error {err:.2e}"
    return {"rows": len(recorder.rows), "worst_rel_err_e9": int(worst * 1e9)}


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_matches_hf(family: str, tiny_checkpoints: dict[str, Path]) -> None:
    model_dir = tiny_checkpoints[family]
    llm = LLM(str(model_dir), device="cpu", max_num_batched_tokens=24)  # forces chunked prefill
    check_against_hf(model_dir, llm, PROMPTS)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hits_match_hf(family: str, tiny_checkpoints: dict[str, Path]) -> None:
    model_dir = tiny_checkpoints[family]
    llm = LLM(str(model_dir), device="cpu")
    shared = list(range(100, 140))
    llm.generate([shared + [1, 2]], SamplingParams(temperature=0, max_tokens=4))
    stats_before = llm.engine.block_manager.stats.hit_tokens
    check_against_hf(model_dir, llm, [shared + [3, 4, 5], shared + [6]], max_tokens=32)
    assert llm.engine.block_manager.stats.hit_tokens - stats_before >= 2 * 32, "expected prefix-cache hits"


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_matches_hf(family: str, tiny_checkpoints: dict[str, Path]) -> None:
    model_dir = tiny_checkpoints[family]
    # 4 sequences of up to ~100 tokens need ~28 blocks; 12 forces preemption (recompute).
    llm = LLM(str(model_dir), device="cpu", num_blocks=12, block_size=16, max_model_len=160)
    check_against_hf(model_dir, llm, PROMPTS)
    assert llm.engine.stats().num_preemptions > 0
    llm.engine.block_manager.check_invariants(set())
    assert llm.engine.block_manager.num_free_blocks == 12


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_matches_hf(rope: dict, tmp_path: Path) -> None:
    model_dir = write_random_checkpoint(tmp_path, "llama", rope_scaling=rope, max_position_embeddings=1024)
    llm = LLM(str(model_dir), device="cpu")
    check_against_hf(model_dir, llm, PROMPTS[:2], max_tokens=16)
