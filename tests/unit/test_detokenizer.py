"""Streaming detokenization never emits half a character."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rtpllm.tokenizer import IncrementalDetokenizer
from rtpllm.tokenizer.byte_tokenizer import build_byte_tokenizer

TOK = build_byte_tokenizer(320)


def decode(ids, skip: bool) -> str:
    return TOK.decode(list(ids), skip_special_tokens=skip)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40) | st.sampled_from(["a<|endoftext|>b", "日<|im_end|>"]), st.text(max_size=10))
def test_deltas_are_whole_characters_and_add_up(text: str, prompt: str) -> None:
    ids = TOK.encode(text, add_special_tokens=False).ids
    # The text may spell a special token ("<|endoftext|>"), which decoding skips.
    expected = TOK.decode(ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(decode, TOK.encode(prompt, add_special_tokens=False).ids)
    deltas = [detok.step(i) for i in ids]
    if "\ufffd" not in expected:
        assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == expected


def test_multibyte_character_waits_for_its_last_byte() -> None:
    ids = TOK.encode("日", add_special_tokens=False).ids
    assert len(ids) == 3
    detok = IncrementalDetokenizer(decode, [])
    assert [detok.step(i) for i in ids] == ["", "", "日"]


def test_special_tokens_are_skipped_or_kept() -> None:
    im_end = TOK.token_to_id("<|im_end|>")
    ids = TOK.encode("ok", add_special_tokens=False).ids + [im_end]
    skip = IncrementalDetokenizer(decode, [], skip_special_tokens=True)
    keep = IncrementalDetokenizer(decode, [], skip_special_tokens=False)
    assert "".join(skip.step(i) for i in ids) == "ok"
    assert "".join(keep.step(i) for i in ids) == "ok<|im_end|>"
