"""Which dots the decode kernel runs over a quantized cache (decode_attention.decode_dots):
1-byte tiles widen from 16-bit words (into even/odd halves) only where every
row starts on a 16-bit word and rows are whole; elsewhere whole tiles, never a misaligned
word read."""

from __future__ import annotations

import pytest
import torch

from rtpllm.kernels import decode_attention

HALVES = 2  # F16_DOTS of tiles widened from words into halves (the interpreter too)


def cache(head_dim: int, dtype: torch.dtype = torch.float8_e4m3fn, offset: int = 0) -> torch.Tensor:
    """A [blocks, 16, 8, head_dim] value view into a byte buffer, `offset` bytes in."""
    buf = torch.zeros(4 * 16 * 8 * head_dim + 2, dtype=torch.uint8)
    return buf[offset : offset + 4 * 16 * 8 * head_dim].view(dtype).view(4, 16, 8, head_dim)


@pytest.fixture(autouse=True)
def defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_attention, "FP8_WIDEN_PAIRS", True)
    monkeypatch.setattr(decode_attention, "INT8_WIDEN_PAIRS", True)
    monkeypatch.setattr(decode_attention, "FP8_F16_DOTS", False)


def test_rows_on_words_widen_in_halves() -> None:
    c = cache(128)
    assert decode_attention.decode_dots(1, torch.bfloat16, c, c) == HALVES
    assert decode_attention.decode_dots(1, torch.float16, c, c) == HALVES


def test_no_pairs_where_a_row_could_start_mid_word_or_rows_are_not_whole() -> None:
    odd = cache(128, offset=1)
    assert odd.data_ptr() % 2 == 1
    assert decode_attention.decode_dots(1, torch.bfloat16, odd, cache(128)) == 0
    c80 = cache(80)
    assert decode_attention.decode_dots(1, torch.bfloat16, c80, c80) == 0  # head_dim not a power of two


def test_other_formats_and_switches() -> None:
    c = cache(128)
    assert decode_attention.decode_dots(1, torch.float32, c, c) == 0  # fp32 queries: fp32 dots
    i8 = cache(128, torch.int8)
    assert decode_attention.decode_dots(2, torch.bfloat16, i8, i8) == HALVES
    decode_attention.INT8_WIDEN_PAIRS = False
    assert decode_attention.decode_dots(2, torch.bfloat16, i8, i8) == 0
    decode_attention.FP8_WIDEN_PAIRS = False
    assert decode_attention.decode_dots(1, torch.bfloat16, c, c) == 0
    decode_attention.FP8_F16_DOTS = True
    assert decode_attention.decode_dots(1, torch.bfloat16, c, c) == 1
