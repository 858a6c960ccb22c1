"""The adaptive policy, run step by step against step costs calibrated on an H100
(bench/spec_policy.py): it must not slow a loaded batch whatever the acceptance, and
must take the gains where drafts pay. Averages over seeds: single runs at batch 1 are
a few dozen coin tosses."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from bench.spec_policy import DEVICES, simulate
from rtpllm.speculative.adaptive import PolicyConfig

ADAPTIVE = PolicyConfig(max_k=4)


def speedup(device: str, acceptance: float, tokens: int, seeds: int = 4, warm: bool = False) -> float:
    return statistics.mean(simulate(DEVICES[device], acceptance, tokens, ADAPTIVE, seed=s, warm=warm).speedup for s in range(seeds))


@pytest.mark.parametrize("acceptance", [0.0, 0.29])
def test_low_acceptance_at_batch_64_costs_at_most_3_percent(acceptance: float) -> None:
    # Fixed k = 4 here: 0.56x at A = 0, 0.73x at A = 0.29 (128 tokens).
    assert speedup("llama8b-b64", acceptance, 128) >= 0.97
    assert speedup("llama8b-b64", acceptance, 512) >= 0.985


def test_a_batch_of_alike_requests_at_middling_acceptance_does_not_lose() -> None:
    """On session 7's H100 costs (cheap verify steps) at A = 0.5, every request alike: the
    run lost 10% on the GPU (0.902x), and 0.84-0.95x simulated, while each request's
    estimate followed its own luck (the lucky drafted, the unlucky finished last). Pooled
    by how alike the requests are (`pooling_weight`): 0.95-0.98x."""
    assert speedup("llama8b-b64-s7", 0.5, 128, seeds=3) >= 0.95
    assert speedup("llama8b-b64-s7", 0.7, 128, seeds=3) >= 1.17


def test_a_slow_warm_up_step_and_jittery_steps_do_not_stop_a_small_model_drafting() -> None:
    """The 1.5B shape at batch 1: the bench's warm-up leaves one slow 2-token verify step
    (3.57 ms, twice a pipelined step) and real steps vary. With the cost curve made
    monotone from the dearer side, that price held every bigger step's too, and with 20%
    jitter a run stopped drafting for good (1.00x on seed 1; the H100 run drafted in ~118
    of ~330 steps, 1.28x). From the cheaper side (`StepCostModel._monotone`): 1.63-1.85x."""
    jittery = statistics.mean(
        simulate(DEVICES["qwen15b-b1"], 0.7, 512, ADAPTIVE, seed=s, jitter=0.2).speedup for s in range(3)
    )
    assert jittery >= 1.55
    assert speedup("qwen15b-b1", 0.7, 128, seeds=2) >= 1.5


def test_a_warm_batch_starts_from_what_drafts_achieved_for_the_last_one() -> None:
    """A second batch on the same engine (a serving engine's steady state): its new
    requests lean on the acceptance the others had, so at A = 0.7 they draft from
    the first step (an even prior kept them from it on the H100: 0.95x, with the
    batch backed off for good) and at A = 0.29 they hardly try."""
    assert speedup("llama8b-b64", 0.7, 128, seeds=2, warm=True) >= 1.15
    assert speedup("llama8b-b64", 0.29, 128, seeds=2, warm=True) >= 0.985


@pytest.mark.parametrize("acceptance", [0.0, 0.5, 0.9])
def test_a_compute_bound_batch_never_drafts_for_long(acceptance: float) -> None:
    assert speedup("compute-b64", acceptance, 512, seeds=2) >= 0.98


def test_drafts_that_pay_are_taken() -> None:
    assert speedup("llama8b-b64", 0.7, 512, seeds=2) >= 1.3  # fixed k = 4: 1.45x
    assert speedup("llama8b-b64", 0.9, 512, seeds=2) >= 2.0  # fixed k = 4: 2.17x
    assert speedup("llama8b-b1", 0.7, 128) >= 1.9  # fixed k = 4: 2.12x
    # fixed k = 4: 1.81x. The 1.5B's warm-up leaves one slow 2-token verify step (3.57 ms,
    # as on the H100): sizes settle through exploration before drafting starts.
    assert speedup("qwen15b-b1", 0.7, 512) >= 1.6


def test_batch_one_at_low_acceptance() -> None:
    assert speedup("llama8b-b1", 0.0, 128) >= 0.96
    assert speedup("qwen15b-b1", 0.29, 128) >= 0.96  # fixed k = 4: 0.90x
    assert speedup("llama8b-b1", 0.29, 512) >= 1.03  # drafts are cheap at the 8B's batch 1


def test_the_command_writes_its_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.spec_policy import main

    out = tmp_path / "policy.json"
    main(["--devices", "llama8b-b1", "--acceptance", "0.7", "--mixed", "--tokens", "32", "--fixed", "4", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["policy"] for r in rows] == ["adaptive", "fixed k=4"]
    assert all(r["speedup"] > 1 for r in rows)
    assert "llama8b-b1 | 0.7 | 32 | adaptive" in capsys.readouterr().out


def test_a_served_batch_of_mixed_acceptance_drafts_for_those_it_pays_for() -> None:
    """Open batches (a finished request's place taken at once, as on a busy server):
    half the requests accept 0.9 of drafts, half 0.1; drafting for the first half only
    beats both no drafts and fixed k = 4 for everyone (1.46x here)."""

    def open_speedup(config: PolicyConfig) -> float:
        return statistics.mean(simulate(DEVICES["llama8b-b64"], [0.9, 0.1], 256, config, seed=s, open_batch=True).speedup for s in range(2))

    assert open_speedup(ADAPTIVE) >= open_speedup(PolicyConfig(max_k=4, adaptive=False)) + 0.1


def test_a_queue_of_prompts_over_repeated_runs_as_the_bench_runs_them() -> None:
    """`prompts` and `runs` model `bench/speculative.py --num-prompts 256 --repeats 3`:
    requests replaced while any wait, then the tail, on one speculator run after run.
    Off's figure counts the last wave's smaller batch (100 prompts: 64 then 36 rows),
    so drafting nothing is ~1.0x whatever the count; on session 9's H100 costs the
    policy holds ~1.0x at A = 0.29 and gains at A = 0.7 in every run (the H100 gave
    0.990x / 0.999x and 1.31x / 1.10x in session 10)."""
    device = DEVICES["llama8b-b64-s9"]
    none = simulate(device, 0.0, 64, ADAPTIVE, prompts=100, runs=2)
    assert none.run_speedups is not None and len(none.run_speedups) == 2
    assert all(0.97 <= x <= 1.01 for x in none.run_speedups)
    low = simulate(device, 0.29, 128, ADAPTIVE, prompts=256, runs=3)
    assert low.speedup >= 0.98 and min(low.run_speedups or [0.0]) >= 0.97
    high = simulate(device, 0.7, 128, ADAPTIVE, prompts=256, runs=3)
    assert min(high.run_speedups or [0.0]) >= 1.1
