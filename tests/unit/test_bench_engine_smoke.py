"""bench/engine.py throughput --timeline on the CPU (tiny shape): the step timeline that
splits an offline run into decode steps and steps with prefill tokens adds up, in each
pass of --passes. In a
subprocess, as the bench is run (engines built in the test process would leave their
OpenMP settings to later tests' subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_throughput_timeline_adds_up(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    argv = [sys.executable, "bench/engine.py", "throughput", "--smoke", "--timeline", "--passes", "2", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(out.read_text())
    first = res["throughput[tiny]"]
    (second,) = first["passes"]  # --passes 2: the same workload's second run, new prompts
    assert second["input_tokens"] != first["input_tokens"]
    for run in (first, second):
        timeline = run["timeline"]
        decode, prefill = timeline["decode"], timeline["prefill"]
        assert decode["steps"] > 0 and prefill["steps"] > 0
        assert decode["mean_tokens"] == decode["mean_decode_rows"]  # pure decode steps
        assert prefill["mean_tokens"] > prefill["mean_decode_rows"]
        # The timed run's steps, from the first launch to the last: within its wall time.
        assert 0.5 * run["seconds"] < decode["seconds"] + prefill["seconds"] <= run["seconds"]
        assert run["output_tokens"] == run["requests"] * 16


@pytest.mark.timeout(180)
def test_batch_decode_profile_runs(tmp_path: Path) -> None:
    """bench/engine.py profile-batch: the per-kernel table and the step summary are
    written (on the CPU the kernels' GPU time is 0: the summary still says so)."""
    out = tmp_path / "profile.json"
    argv = [sys.executable, "bench/engine.py", "profile-batch", "--smoke", "--device", "cpu", "--profile", str(tmp_path), "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads(out.read_text())["profile-batch[tiny]"]
    assert summary["batch"] == 8 and summary["steps"] == 3
    assert 0 < summary["step_ms"] and summary["gpu_kernel_ms_per_step"] == 0.0
    table = (tmp_path / "batch_decode_profile.txt").read_text()
    assert "aten::" in table
    assert "GPU busy 0.00" in table  # trace_gaps over the profiled steps: no GPU on the CPU
    assert (tmp_path / "batch_decode_trace.gaps.json").exists()


@pytest.mark.timeout(180)
def test_admission_profile_runs(tmp_path: Path) -> None:
    """bench/engine.py profile-admission: the op tables of admitting new prompts on a
    quantized cache and the summary are written."""
    out = tmp_path / "profile.json"
    argv = [sys.executable, "bench/engine.py", "profile-admission", "--smoke", "--device", "cpu", "--kv-cache-dtype", "fp8",
            "--profile", str(tmp_path), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads(out.read_text())["profile-admission[tiny]"]
    assert summary["prompts"] == 4 and summary["kv_cache_dtype"] == "fp8" and summary["prompt_tokens"] >= 400
    assert 0 < summary["unprofiled_ms"] and summary["gpu_kernel_ms"] == 0.0
    assert "aten::" in (tmp_path / "admission_profile_fp8.txt").read_text()


@pytest.mark.timeout(180)
def test_prefill_splits_its_wall_time(tmp_path: Path) -> None:
    """bench/engine.py prefill: the wall time splits into the host's work before the
    forward, the forward and the rest, which add up to it (on the CPU the forward is
    the host's time inside the runner's batch)."""
    out = tmp_path / "prefill.json"
    argv = [sys.executable, "bench/engine.py", "prefill", "--smoke", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(out.read_text())["prefill[tiny,256]"]
    assert 0 < r["host_before_forward_ms"] < r["median_ms"] and 0 < r["forward_device_ms"] < r["median_ms"]
    # Medians of parts need not sum to the median of wholes exactly; the parts stay within it.
    assert r["host_before_forward_ms"] + r["forward_device_ms"] <= 1.5 * r["median_ms"]
    assert "host before forward" in proc.stdout
