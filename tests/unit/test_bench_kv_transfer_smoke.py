"""bench/kv_transfer.py runs end to end (tiny shape, receiver in a spawned process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import kv_transfer
from rtpllm.transfer.endpoint import shm_available


@pytest.mark.timeout(60)
def test_kv_transfer_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kv.json"
    backends = ["tcp", "shm"] if shm_available() else ["tcp"]
    report = kv_transfer.main(["--smoke", "--backends", ",".join(backends), "--json", str(out)])
    assert json.loads(out.read_text())["results"] == report["results"]
    assert report["config"]["smoke"] is True
    for backend in backends:
        row = report["results"][backend]
        assert "error" not in row, row
        assert row["verified"] is True
        assert row["blocks"] == 8 and row["gbps_median"] > 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(backends[-1])  # the table comes last
