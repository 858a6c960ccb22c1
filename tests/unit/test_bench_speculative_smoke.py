"""bench/speculative.py runs end to end (tiny random shape, CPU): off and on side by
side, outputs identical, the replay proposer at full acceptance accepting drafts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import speculative


@pytest.mark.timeout(300)
def test_speculative_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    # --no-adaptive: what the adaptive policy chooses depends on this machine's timings.
    argv = ["--shape", "tiny", "--device", "cpu", "--methods", "replay,ngram,idle", "--acceptance", "1.0",
            "--batch", "1", "3", "--max-tokens", "12", "--prompt-len", "20", "--no-adaptive", "--out", str(out)]  # fmt: skip
    assert speculative.main(argv) == 0  # 0: every run identical to speculation off
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["batch"]) for r in rows] == [
        ("off", 1), ("replay", 1), ("ngram", 1), ("idle", 1), ("off", 3), ("replay", 3), ("ngram", 3), ("idle", 3),
    ]  # fmt: skip
    # idle: the speculating engine with every request opted out drafts nothing (on the
    # CPU, without async scheduling, every step still asks for a plan: empty ones).
    idle = [r for r in rows if r["method"] == "idle"]
    assert all(r["identical_to_off"] and r["proposed"] == 0 and r["verify_steps"] == 0 for r in idle)
    replay = [r for r in rows if r["method"] == "replay"]
    assert all(r["identical_to_off"] and r["accepted"] > 0 and r["tokens_per_request_step"] > 1.5 for r in replay)
    # Steps counted: every verify step is an engine step, and at batch 1 with every draft
    # right (12 tokens, up to 5 a step) fewer steps than tokens. (Plans near max_tokens,
    # with no room left for drafts, draft nothing: empty plans.)
    one = replay[0]
    assert 0 < one["verify_steps"] <= one["engine_steps"] < 12 and 0 <= one["empty_plans"] < one["engine_steps"]
    assert rows[0]["engine_steps"] >= 12 and rows[0]["verify_steps"] == 0


@pytest.mark.timeout(300)
def test_speculative_bench_warm_batch_and_more_prompts_than_the_batch(tmp_path: Path) -> None:
    """--warm-batch: an untimed batch over other prompts first, in every engine; the
    timed run's histograms leave it out. --num-prompts past the batch: finished requests
    replaced (an open batch), on a random shape too."""
    out = tmp_path / "spec.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--methods", "replay", "--acceptance", "1.0", "--batch", "2",
            "--num-prompts", "4", "--warm-batch", "--max-tokens", "10", "--prompt-len", "16", "--no-adaptive",
            "--out", str(out)]  # fmt: skip
    assert speculative.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["warm_batch"] is True
    off, replay = result["rows"]
    assert (off["method"], replay["method"]) == ("off", "replay")
    assert replay["identical_to_off"] and replay["requests"] == 4 and replay["output_tokens"] == 40
    # One chosen k per request per decode step of the timed run (its first step is the
    # prefill's), none of the warm batch's.
    assert sum(replay["chosen_k"].values()) == replay["request_steps"] - replay["requests"]


@pytest.mark.timeout(300)
def test_speculative_bench_repeats_report_the_median_run(tmp_path: Path) -> None:
    """--repeats N: N timed runs per engine; each row is its median run, with every run's
    seconds (off's: both engines' runs). Refused with the suffix proposer, whose global
    trie would draft from the earlier runs' outputs."""
    out = tmp_path / "spec.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--methods", "replay", "--acceptance", "1.0", "--batch", "2",
            "--max-tokens", "8", "--prompt-len", "16", "--no-adaptive", "--repeats", "3", "--out", str(out)]  # fmt: skip
    assert speculative.main(argv) == 0
    off, replay = json.loads(out.read_text())["rows"]
    assert len(off["all_seconds"]) == 6 and len(replay["all_seconds"]) == 3
    assert replay["seconds"] == pytest.approx(sorted(replay["all_seconds"])[1], abs=2e-3)
    middle = sorted(off["all_seconds"])[2:4]
    assert off["seconds"] == pytest.approx((middle[0] + middle[1]) / 2, abs=2e-3)
    assert replay["identical_to_off"] and replay["accepted"] > 0
    with pytest.raises(SystemExit, match="suffix"):
        speculative.main([*argv[:5], "suffix", *argv[6:]])
