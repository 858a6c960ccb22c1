"""bench/kv_quant.py's capacity, speed and tiers parts run end to end (tiny shape, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import kv_quant
from rtpllm.loader.random_checkpoint import TINY_SHAPE


@pytest.mark.timeout(300)
def test_kv_quant_bench_capacity_and_speed_smoke(tmp_path: Path) -> None:
    out = tmp_path / "kvq.json"
    assert kv_quant.main(["capacity", "--smoke", "--out", str(out)]) == 0
    cap = json.loads(out.read_text())["capacity"]
    head_dim = TINY_SHAPE["hidden_size"] // TINY_SHAPE["num_attention_heads"]
    for fmt in ("fp8", "int8"):
        # The pool is sized in bytes: a quantized block is (D + 4) / 2D of a bf16 one.
        assert cap[fmt]["blocks_vs_bf16"] == pytest.approx(2 * head_dim / (head_dim + 4), rel=0.01)
    assert kv_quant.main(["speed", "--smoke", "--out", str(out)]) == 0
    speed = json.loads(out.read_text())["speed"]
    for fmt in ("bf16", "fp8", "int8"):
        assert speed["itl"][fmt]["fits"] and speed["itl"][fmt]["itl_ms"] > 0
        assert speed["offline"][fmt]["output_tok_per_s"] > 0
        timeline = speed["offline"][fmt]["timeline"]
        assert timeline["decode"]["steps"] > 0 and timeline["prefill"]["steps"] > 0


@pytest.mark.timeout(120)
def test_kv_quant_bench_tiers_smoke(tmp_path: Path) -> None:
    out = tmp_path / "kvq.json"
    assert kv_quant.main(["tiers", "--smoke", "--out", str(out)]) == 0
    tiers = json.loads(out.read_text())["tiers"]
    head_dim = TINY_SHAPE["hidden_size"] // TINY_SHAPE["num_attention_heads"]
    for fmt in ("fp8", "int8"):
        # Restored and transferred bit for bit (checked inside), at (D + 4) / 2D the bytes.
        assert tiers[fmt]["bytes_vs_bf16"] == pytest.approx((head_dim + 4) / (2 * head_dim))
        assert tiers[fmt]["host_restore_ms"] > 0 and tiers[fmt]["pd_transfer_tcp_ms"] > 0
    # The mixed plan (layer 0 bf16, the rest int8) moves as layer pages, each its own size.
    layers = TINY_SHAPE["num_hidden_layers"]
    int8_share = (head_dim + 4) / (2 * head_dim)
    mixed = tiers["int8_layer0_bf16"]
    assert mixed["bytes_vs_bf16"] == pytest.approx((1 + (layers - 1) * int8_share) / layers)
    assert mixed["host_restore_ms"] > 0 and mixed["pd_transfer_tcp_ms"] > 0


@pytest.mark.timeout(120)
def test_kv_quant_bench_profile_smoke(tmp_path: Path) -> None:
    out = tmp_path / "kvq.json"
    assert kv_quant.main(["profile", "--smoke", "--profile-dir", str(tmp_path / "prof"), "--out", str(out)]) == 0
    prof = json.loads(out.read_text())["profile"]
    for fmt in ("bf16", "fp8"):
        assert prof[f"{fmt}_eager"]["itl_ms"] > 0
        # 2 sequences of 64 prompt tokens and 4 decoded: 5 blocks of 16 each, all read.
        assert prof[f"{fmt}_eager"]["blocks_held"] == 10 and prof[f"{fmt}_eager"]["kv_GB"] > 0
        assert "GB/s" in (tmp_path / "prof" / f"decode_profile_{fmt}_eager.txt").read_text()
