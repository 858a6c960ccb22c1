"""bench/tp_kv_transfer.py runs end to end (tiny random model, a TP=1 and a TP=2 engine
on the CPU, every transfer and tier restore verified bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import tp_kv_transfer
from rtpllm.transfer.endpoint import shm_available


@pytest.mark.timeout(120)
def test_tp_kv_transfer_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tp.json"
    backends = ["shm", "tcp"] if shm_available() else ["tcp"]
    report = tp_kv_transfer.main(["--smoke", "--backends", ",".join(backends), "--json", str(out)])
    assert json.loads(out.read_text())["results"] == report["results"]
    assert report["config"]["smoke"] is True and report["shape"]["blocks"] == 4
    assert report["shape"]["kv_heads"] == 2, "the wire block is whole: every KV head of the model"
    for backend in backends:
        rows = report["results"]["transfer"][backend]
        assert set(rows) == {"TP=1 -> TP=1", "TP=2 -> TP=1", "TP=1 -> TP=2"}
        for name, row in rows.items():
            assert row["verified"] is True, (backend, name)
            assert row["ms_median"] > 0 and len(row["ms_samples"]) == 2
    for name in ("TP=1", "TP=2"):
        view = report["results"]["view"][name]
        assert view["gather"]["ms_median"] > 0 and view["scatter"]["ms_median"] > 0
        tiers = report["results"]["tiers"][name]
        assert tiers["verified"] is True, name  # whole blocks, restored and read back bit for bit
        assert tiers["store"]["ms_median"] > 0 and tiers["store_1"]["ms_median"] > 0 and tiers["restore"]["ms_median"] > 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{backends[-1]} TP=1 -> TP=2")  # the table comes last
