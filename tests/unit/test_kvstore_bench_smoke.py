"""bench/kv_tiers.py --smoke: every tier (Redis included, on its own redis-server) is
filled, restored into a CPU pool and verified; the table comes last. Checks that the
script runs and reports, not the numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rtpllm.runtime.processes import redis_server_binary

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_restores_from_every_tier(tmp_path: Path) -> None:
    try:
        redis_server_binary()
        tiers = ["host", "ssd", "ssd-warm", "redis"]
    except FileNotFoundError:
        tiers = ["host", "ssd", "ssd-warm"]
    out = tmp_path / "tiers.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "bench/kv_tiers.py",
        "--smoke",
        "--json",
        str(out),
        "--ssd-dir",
        str(tmp_path / "ssd"),
    ]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("tier "))
    assert "GB/s" in lines[header] and "page cache" in lines[header]
    rows = lines[header + 1 :]
    assert [row.split()[0] for row in rows] == tiers
    assert all(row.split()[-1] == "yes" for row in rows)

    report = json.loads(out.read_text())
    results = report["results"]
    assert results["encode"]["gbps"] > 0
    for tier in tiers:
        assert results[tier]["verified"] and results[tier]["gbps_median"] > 0
        assert results[tier]["blocks"] == 16
    assert results["ssd"]["page_cache"] in ("fadvise", "drop_caches", "warm")
    # Each lower tier was read on every repeat (the host tier emptied in between).
    assert (
        results["stats"]["ssd"]["ssd"]["hits"] == 16 * 3 * 2
    )  # ssd and ssd-warm: 1 warm-up + 2 repeats each
    assert (tmp_path / "ssd").is_dir()
