"""bench/prefix_routing.py --smoke: the three router policies, each on a fresh stack of 2
combined workers (tiny model, CPU), replaying the same multi-turn conversations. Checks
that the script runs, prints its table and targets, and that cache-aware routing finds
at least as much of the prompts cached as round-robin; not the TTFT targets (two shared
cores and a tiny model say nothing about them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ["round-robin", "least-loaded", "cache-aware"]


def test_smoke_compares_the_three_policies(tmp_path: Path) -> None:
    out = tmp_path / "routing.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "bench/prefix_routing.py",
        "--smoke",
        "--json",
        str(out),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]

    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("policy "))
    assert "hit ratio" in lines[header] and "TTFT p50" in lines[header] and "out tok/s" in lines[header]
    table = lines[header + 1 : header + 4]
    assert [row.split()[0] for row in table] == POLICIES, "\n".join(lines[header:])
    assert lines[-2].startswith("target: cache-aware TTFT p95 >= 40% lower than round-robin's")
    assert lines[-1].startswith("target: cache-aware hit ratio >= 2x round-robin's")

    report = json.loads(out.read_text())
    assert not report["failures"]
    rows = {r["policy"]: r for r in report["results"]}
    assert list(rows) == POLICIES
    n = report["workload"]["conversations"] * report["workload"]["turns"]
    for row in rows.values():
        assert row["requests"] == row["completed"] == n and row["errors"] == 0, row["first_errors"]
        assert row["ttft_p95_ms"] >= row["ttft_p50_ms"] > 0
        assert row["requests_per_s"] > 0 and row["output_tokens_per_s"] > 0
        assert 0 <= row["hit_ratio"] <= 1
        # The bus tap saw where every request went; each gateway routed every request.
        assert sum(row["gateway"]["decisions"].values()) == n
        assert row["stayed"] + row["moved"] == row["later_turns"] > 0
    # Later turns extend their conversation's previous prompt: cache-aware routing sends
    # them where it is cached; round-robin does not look.
    assert rows["cache-aware"]["hit_ratio"] >= rows["round-robin"]["hit_ratio"]
    assert rows["cache-aware"]["gateway"]["decisions"].get("cache", 0) > 0
