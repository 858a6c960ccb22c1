"""bench/mixed_steps.py runs end to end on the CPU (tiny shape, both modes; the CPU has no
CUDA graphs, so "graphs" runs eager there): the script of issue 23's mixed-step ITL run
is checked before the GPU run. In a subprocess, as it is run: engines built in the test
process would leave their threads and OpenMP settings to the tests after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_both_modes_run(tmp_path: Path) -> None:
    out = tmp_path / "mixed.json"
    argv = [sys.executable, "bench/mixed_steps.py", "--shape", "tiny", "--device", "cpu", "--streams", "2",
            "--prompt-len", "96", "--interval", "0.3", "--duration", "1.0", "--max-num-batched-tokens", "64",
            "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(out.read_text())
    for mode in ("eager", "graphs"):
        r = res[mode]
        assert r["gaps"] > 0 and r["itl_ms"]["p99"] >= r["itl_ms"]["p50"] > 0
        assert r["prompts_arrived"] >= 3 and 0 < r["steps_with_prefill"] < r["steps"]
        assert r["mixed_replays"] == 0  # no CUDA here
    assert proc.stdout.splitlines()[-1].startswith("graphs ")  # the summary table, last
