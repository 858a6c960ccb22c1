"""bench/kv_tiers.py --smoke: every tier (Redis included, on its own redis-server) is
filled, restored into a CPU pool and verified; the table comes last. With --ttft, a tiny
engine serves a prompt from each tier (every block restored from it) and recomputes
one, and the cost model's choice per tier is reported. Checks that the script runs and
reports, not the numbers."""

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


def available_tiers() -> list[str]:
    try:
        redis_server_binary()
        return ["host", "ssd", "ssd-warm", "redis"]
    except FileNotFoundError:
        return ["host", "ssd", "ssd-warm"]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "bench/kv_tiers.py", "--smoke", *args]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def test_smoke_restores_from_every_tier(tmp_path: Path) -> None:
    tiers = available_tiers()
    out = tmp_path / "tiers.json"
    proc = run_bench("--json", str(out), "--ssd-dir", str(tmp_path / "ssd"))

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


def test_smoke_ttft_serves_a_prompt_from_every_tier(tmp_path: Path) -> None:
    tiers = available_tiers()
    out = tmp_path / "ttft.json"
    # An SSD tier configured absurdly slow (1 KB/s: slower than recompute however loaded
    # the machine is): the cost model must recompute what it holds.
    proc = run_bench("--ttft", "--gb-per-s", "ssd=0.000001", "--json", str(out), "--ssd-dir", str(tmp_path))

    lines = proc.stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("tier "))  # the second table
    assert lines[header].split() == [
        "tier", "restore", "ms", "GB/s", "recompute", "ms", "faster", "cfg", "GB/s", "cost", "model", "its", "ms", "right"
    ]  # fmt: skip
    rows = [row.split() for row in lines[header + 1 :]]
    assert [row[0] for row in rows] == tiers, "the TTFT table comes last"
    assert all(row[-1] in ("yes", "close", "NO") for row in rows)

    results = json.loads(out.read_text())["results"]
    assert all(results[tier]["verified"] for tier in tiers), "the restore half ran first"
    ttft = results["ttft"]
    assert ttft["shape"] == "tiny" and ttft["restored_blocks"] == (512 - 1) // 16
    assert ttft["recompute_ms_median"] > 0 and ttft["prefill_tokens_per_s_learned"] > 0
    assert ttft["demoted_blocks"] == 0, "nothing reached a tier but what the bench put there"
    for tier in tiers:
        row = ttft["tiers"][tier]
        assert row["restore_ms_median"] > 0 and len(row["restore_ms_samples"]) == 2
        assert row["configured_gb_per_s"] > 0
    assert ttft["tiers"]["host"]["cost_model"] == "restore"
    for tier in ("ssd", "ssd-warm"):
        assert ttft["tiers"][tier]["cost_model"] == "recompute"
        assert ttft["tiers"][tier]["cost_model_restored_blocks"] == [0, 0]
    assert ttft["tiers"]["ssd"]["page_cache"] in ("fadvise", "drop_caches", "warm")
    assert not list(tmp_path.glob("kv-tiers-ttft-*")), "the engine's SSD directory is removed"
