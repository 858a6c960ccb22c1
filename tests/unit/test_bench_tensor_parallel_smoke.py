"""bench/tensor_parallel.py runs every phase end to end on the CPU (gloo, tiny shape,
TP=2): the script issue 20's two-GPU run uses is checked before a GPU pair is lent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import tensor_parallel


@pytest.mark.timeout(300)
def test_every_phase_runs_at_tp2(tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    assert tensor_parallel.main(["all", "--smoke", "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["decode8b"]["tp1"]["tok_per_s"] > 0 and res["decode8b"]["tp2"]["tok_per_s"] > 0
    assert res["allreduce"]["collectives_per_step"] == 2 * 2 + 1 and res["allreduce"]["ms_per_step"] > 0
    assert res["decode70b"]["tp"] == 2 and res["offline70b"]["output_tokens"] == 4 * 8
    assert res["load70b"]["checkpoint_GB"] > 0 and res["load70b"]["layers_written"] == res["load70b"]["layers"]
    # The same checkpoint at TP=2 and TP=1 in fp32: identical greedy tokens.
    assert res["check"]["identical"] and res["check"]["passed"]
    assert not list((tmp_path / "ckpt").glob("run-*")), "the written checkpoints are removed"
