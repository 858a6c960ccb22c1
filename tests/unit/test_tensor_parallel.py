"""Tensor parallelism end to end on the CPU (gloo, worker processes): TP=2 computes the
logits of TP=1 (fp32, 1e-5 relative) and the same greedy tokens for every family,
through chunked prefill, prefix-cache hits and preemption. One TP=2 engine per family
serves all cases (test_tp_failures.py has the rest: async scheduling, replicated KV
heads, dead ranks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rtpllm import LLM, SamplingParams
from rtpllm.engine.scheduler import SchedulerOutput
from tests.conftest import FAMILIES

RTOL = 1e-5
# 192 tokens of KV: four 40-token prompts decoding 30 tokens preempt; chunks of 32 tokens.
ENGINE = {"device": "cpu", "block_size": 8, "num_blocks": 24, "max_model_len": 128, "max_num_batched_tokens": 32}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_rank() -> Iterator[None]:
    """One torch thread per process (the workers take rank 0's count): with two ranks on
    two shared cores, spinning OpenMP threads of one rank starve the other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder:
    """Every step's logits (all packed tokens), in step order."""

    def __init__(self, llm: LLM) -> None:
        self.steps: list[torch.Tensor] = []
        llm.engine.runner.logits_observer = self

    def __call__(self, step: SchedulerOutput, logits: torch.Tensor) -> None:
        self.steps.append(logits.clone())

    def take(self) -> list[torch.Tensor]:
        steps, self.steps = self.steps, []
        return steps


class Pair:
    """A TP=1 and a TP=2 engine of one checkpoint, fed the same requests."""

    def __init__(self, model_dir: Path, **engine: object) -> None:
        self.one = LLM(str(model_dir), **{**ENGINE, **engine})  # type: ignore[arg-type]
        self.two = LLM(str(model_dir), tensor_parallel_size=2, **{**ENGINE, **engine})  # type: ignore[arg-type]
        self.rec = (Recorder(self.one), Recorder(self.two))

    def generate(
        self, prompts: list[list[int]], params: SamplingParams = GREEDY, fresh: bool = True
    ) -> list[list[int]]:
        """Run the prompts on both (from an empty prefix cache if `fresh`); assert equal
        tokens and matching logits; the tokens."""
        for llm in (self.one, self.two):
            if fresh:
                llm.engine.block_manager.reset_prefix_cache()
        outs = [llm.generate(prompts, params) for llm in (self.one, self.two)]
        tokens = [[o.outputs[0].token_ids for o in out] for out in outs]
        assert tokens[0] == tokens[1], "greedy tokens differ between TP=1 and TP=2"
        ref, got = (r.take() for r in self.rec)
        assert len(ref) == len(got) and ref
        for i, (a, b) in enumerate(zip(ref, got, strict=True)):
            err = ((b - a).abs().max() / a.abs().max()).item()
            assert err < RTOL, f"step {i}: relative error {err:.2e}"
        self.outputs = outs
        return tokens[0]

    def close(self) -> None:
        self.one.close()
        self.two.close()


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request: pytest.FixtureRequest, tiny_checkpoints: dict[str, Path]) -> Iterator[Pair]:
    pair = Pair(tiny_checkpoints[request.param])
    yield pair
    pair.close()
    assert not live(pair.two.engine.tp.workers.pids)  # type: ignore[union-attr]


def prompts_of(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 250, (n, length), generator=g).tolist()


def live(pids: list[int]) -> list[int]:
    """The pids that still run (zombies of our own children count as gone)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def test_chunked_prefill_matches(pair: Pair) -> None:
    prompts = [*prompts_of(1, 70, seed=1), [5, 6, 7]]  # 70 tokens: three chunks of at most 32
    pair.generate(prompts)
    assert pair.two.engine.tp is not None and pair.two.engine.model.layout.size == 2


def test_prefix_cache_hits_match(pair: Pair) -> None:
    base = prompts_of(1, 48, seed=2)[0]
    pair.generate([base])
    pair.generate([base[:40] + [7, 8, 9]], fresh=False)
    assert [o.num_cached_tokens for out in pair.outputs for o in out] == [40, 40]


def test_preemption_matches(pair: Pair) -> None:
    before = pair.two.engine.preemptions_total
    pair.generate(prompts_of(4, 40, seed=3), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert pair.two.engine.preemptions_total > before, "the pool is meant to be too small"
    assert pair.one.engine.preemptions_total == pair.two.engine.preemptions_total
