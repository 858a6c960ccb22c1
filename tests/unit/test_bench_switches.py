"""bench/switches.py: `--set MODULE.NAME=VALUE` changes an rtpllm constant for a bench
run, refuses what it cannot set, and reports what it set."""

from __future__ import annotations

import pytest

from bench import switches
from rtpllm.attention import triton_backend
from rtpllm.kernels import decode_attention


def test_sets_bools_ints_and_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_backend, "QUANT_EXTEND_STORE_FIRST", False)
    monkeypatch.setattr(triton_backend, "QUANT_CHUNK_SDPA_MIN_TOKENS", 512)
    monkeypatch.setattr(decode_attention, "MIN_TOKENS_PER_SPLIT", 256)
    done = switches.apply([
        "attention.triton_backend.QUANT_EXTEND_STORE_FIRST=on",
        "attention.triton_backend.QUANT_CHUNK_SDPA_MIN_TOKENS=none",
        "kernels.decode_attention.MIN_TOKENS_PER_SPLIT=128",
    ])  # fmt: skip
    assert triton_backend.QUANT_EXTEND_STORE_FIRST is True
    assert triton_backend.QUANT_CHUNK_SDPA_MIN_TOKENS is None
    assert decode_attention.MIN_TOKENS_PER_SPLIT == 128
    assert done == {
        "attention.triton_backend.QUANT_EXTEND_STORE_FIRST": True,
        "attention.triton_backend.QUANT_CHUNK_SDPA_MIN_TOKENS": None,
        "kernels.decode_attention.MIN_TOKENS_PER_SPLIT": 128,
    }


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("attention.triton_backend.QUANT_EXTEND_STORE_FIRST", "MODULE.NAME=VALUE"),
        ("attention.triton_backend.forward=1", "upper-case"),
        ("attention.nothing_here.X=1", "no module"),
        ("attention.triton_backend.NOT_A_SWITCH=1", "has no NOT_A_SWITCH"),
        ("attention.triton_backend.QUANT_EXTEND_STORE_FIRST=maybe", "expected one of"),
        ("kernels.decode_attention.MIN_TOKENS_PER_SPLIT=many", "is not an int"),
        ("attention.triton_backend.QUANT_EXTEND_STORE_FIRST=none", "None is not allowed"),
    ],
)
def test_refuses_what_it_cannot_set(item: str, message: str) -> None:
    before = triton_backend.QUANT_EXTEND_STORE_FIRST
    with pytest.raises(SystemExit, match=message):
        switches.apply([item])
    assert triton_backend.QUANT_EXTEND_STORE_FIRST == before
