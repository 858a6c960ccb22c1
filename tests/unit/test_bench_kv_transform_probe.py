"""bench/kv_transform_probe.py runs end to end on a tiny random checkpoint (CPU): every
variant is scored against bf16 KV, and transforms that are exact without quantization
(K and V centering, the Hadamard rotation) keep bf16 KV's perplexity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_probe_scores_every_variant(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    argv = [sys.executable, "bench/kv_transform_probe.py", str(tiny_checkpoints["qwen2"]), "--variants", "bf16+cvh,int8+c",
            "--texts", "2", "--calib-texts", "1", "--max-tokens", "32", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = json.loads(out.read_text())["variants"]
    assert set(rows) == {"bf16", "bf16+cvh", "int8+c"}
    assert abs(rows["bf16+cvh"]["ppl_change_vs_bf16_pct"]) < 0.5, rows
    assert rows["bf16"]["top1_agreement_vs_bf16_pct"] == 100.0
