"""bench/pd_interference.py --smoke: both topologies (2 combined workers; a prefill and a
decode instance) on CPU with a tiny model, end to end through real processes. Checks
that the script runs, measures every phase and prints its table; not the numbers (two
shared cores say nothing about interference)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_runs_both_topologies(tmp_path: Path) -> None:
    out = tmp_path / "pd.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "bench/pd_interference.py",
        "--smoke",
        "--json",
        str(out),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]

    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("config "))
    assert "ITL p99" in lines[header] and "long TTFT p50" in lines[header]
    table = lines[header + 1 : header + 5]
    labels = [
        "aggregated baseline",
        "aggregated + long prompts",
        "disaggregated baseline",
        "disaggregated + long prompts",
    ]
    assert [row[:28].strip() for row in table] == labels, "\n".join(lines[header:])
    assert lines[-1].startswith("target: disaggregated p99 ITL <= 1.2x its baseline")
    assert "aggregated, same run" in lines[-1]

    report = json.loads(out.read_text())
    assert not report["failures"]
    rows = {(r["topology"], r["phase"]): r for r in report["results"]}
    assert set(rows) == {(t, p) for t in ("aggregated", "disaggregated") for p in ("baseline", "long")}
    for row in rows.values():
        assert row["itl_gaps"] > 0 and row["itl_p99_ms"] >= row["itl_p50_ms"] > 0
        assert row["stream_errors"] == 0 and row["long_errors"] == 0, row["first_errors"]
    for topology in ("aggregated", "disaggregated"):
        long = rows[(topology, "long")]
        assert long["long_sent"] > 0 and long["long_done"] == long["long_sent"]
        assert long["long_ttft_p50_ms"] > 0
    # The long prompts went to the prefill instance; the streams' short prompts stayed local.
    counters = rows[("disaggregated", "long")]["counters"]
    assert counters["remote_prefills"] == rows[("disaggregated", "long")]["long_sent"]
    assert counters["local_prefills"] > 0 and counters["remote_fallbacks"] == 0
    assert rows[("disaggregated", "baseline")]["counters"]["remote_prefills"] == 0
    assert (tmp_path / "logs" / "disaggregated" / "decode-1.log").is_file()
