"""bench/serving_tax.py on CPU with a tiny model, end to end through real processes
(nats-server, a worker, the gateway): both sides run, every request gets all its
tokens, and the figures land in the JSON. Not the numbers: the suite's cores are shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rtpllm.loader.random_checkpoint import write_random_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def test_serving_tax_runs_both_sides(tmp_path: Path) -> None:
    model = write_random_checkpoint(tmp_path / "model", "llama")
    out = tmp_path / "tax.json"
    argv = [
        sys.executable, "bench/serving_tax.py", "--model", str(model), "--num-prompts", "4",
        "--input-len", "12:20", "--output-len", "5", "--out", str(out), "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    result = json.loads(out.read_text())
    assert result["offline"]["output_tokens"] == 20
    serving = result["serving"]
    assert serving["errors"] == 0 and serving["output_tokens"] == 20
    assert set(serving["cpu_s"]) == {"worker", "gateway", "nats", "client"}
    assert result["ratio"] > 0
    assert "serving / offline:" in proc.stdout
