"""bench/kv_transfer.py runs end to end (tiny shape, receiver in a spawned process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rtpllm.transfer.endpoint import shm_available

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
def test_kv_transfer_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    backends = "tcp,shm" if shm_available() else "tcp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kv_transfer.py"), "--smoke", "--backends", backends, "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["config"]["smoke"] is True
    for backend in backends.split(","):
        row = report["results"][backend]
        assert "error" not in row, row
        assert row["verified"] is True
        assert row["blocks"] == 8 and row["gbps_median"] > 0
    assert proc.stdout.splitlines()[-1].startswith(backends.split(",")[-1])  # the table comes last
