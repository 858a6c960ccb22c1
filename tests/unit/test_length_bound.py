"""The early prompt-length bound: sound (never above the real token count) wherever it
is given, and withheld for tokenizers whose structure does not guarantee it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from rtpllm.tokenizer.byte_tokenizer import build_byte_tokenizer
from rtpllm.tokenizer.length_bound import LengthBound, length_bound

CORPUS = [
    "the quick brown fox jumps over the lazy dog " * 4,
    "=================== ------------------- ******",
    "        indented code block with    spaces",
    "你好世界，這是一個測試。 héllo wörld ünïcödé",
    "1234567890 3.14159 2718281828",
] * 20


def byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def byte_level_bpe_missing_bytes() -> Tokenizer:
    """As SmolLM2: some control bytes have no token, so those characters vanish."""
    spec = json.loads(byte_level_bpe().to_str())
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    for ch in sorted(alphabet)[:3]:
        spec["model"]["vocab"].pop(ch, None)
    spec["model"]["merges"] = [
        m for m in spec["model"]["merges"] if not any(c in "".join(m) for c in sorted(alphabet)[:3])
    ]
    return Tokenizer.from_str(json.dumps(spec))


def metaspace_byte_fallback_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(CORPUS, trainer)
    return tok


SOUND = {
    "byte_tokenizer": lambda: build_byte_tokenizer(320),
    "byte_level_bpe": byte_level_bpe,
    "byte_level_bpe_missing_bytes": byte_level_bpe_missing_bytes,
    "metaspace_byte_fallback": metaspace_byte_fallback_bpe,
}
PIECES = st.one_of(
    st.characters(exclude_categories=("Cs",)),
    st.sampled_from(["=" * 8, " " * 8, "the ", "<|im_start|>", "你", "\x00", "\n"]),
)
TEXT = st.lists(PIECES, max_size=200).map("".join)


@pytest.mark.parametrize("name", sorted(SOUND))
def test_bound_never_exceeds_the_real_token_count(name: str) -> None:
    tok = SOUND[name]()
    bound = length_bound(tok.to_str())
    assert bound is not None, name

    @settings(max_examples=300, deadline=None)
    @given(TEXT)
    def check(text: str) -> None:
        assert len(tok.encode(text, add_special_tokens=False).ids) >= bound.min_tokens(text)

    check()
    # Long runs of what merges best: still sound, and the bound grows with the length.
    for text in ("=" * 5000, " " * 5000, "the quick brown fox " * 300):
        assert len(tok.encode(text, add_special_tokens=False).ids) >= bound.min_tokens(text) > 0


def test_byte_level_bound_counts_bytes_and_skips_the_ones_that_vanish() -> None:
    tok = byte_level_bpe_missing_bytes()
    bound = length_bound(tok.to_str())
    assert bound is not None and bound.unit == "bytes" and len(bound.dropped) == 3
    vanishing = chr(bound.dropped[0]) * 1000
    assert tok.encode(vanishing).ids == [] and bound.min_tokens(vanishing) == 0
    assert LengthBound(4, "bytes").min_tokens("你好") == 2  # 6 bytes
    assert LengthBound(4, "chars").min_tokens("你好") == 1


def _with(tok: Tokenizer, **changes: object) -> str:
    spec = json.loads(tok.to_str())
    spec.update(changes)
    return json.dumps(spec)


def test_no_bound_where_the_structure_does_not_guarantee_one() -> None:
    base = byte_level_bpe()
    # WordPiece maps a whole long unknown word to one [UNK].
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert length_bound(wp.to_str()) is None
    # Whitespace pre-tokenization drops every space.
    ws = json.loads(base.to_str())
    ws["pre_tokenizer"] = {"type": "Whitespace"}
    assert length_bound(json.dumps(ws)) is None
    # NFC composes characters (fewer of them); lowercase can shorten UTF-8 (the Kelvin sign).
    assert length_bound(_with(base, normalizer={"type": "NFC"})) is None
    assert length_bound(_with(base, normalizer={"type": "Lowercase"})) is None
    # An added token that strips whitespace around it absorbs any run of it.
    stripping = byte_level_bpe()
    stripping.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    assert length_bound(stripping.to_str()) is None
    # Not byte-level, no byte fallback, no unknown token: unknown characters vanish.
    plain = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    assert length_bound(plain.to_str()) is None
    # ... and a fused unknown token swallows a run of them.
    fused = Tokenizer(models.BPE(vocab={"a": 0, "<unk>": 1}, merges=[], unk_token="<unk>", fuse_unk=True))
    assert length_bound(fused.to_str()) is None
    unfused = Tokenizer(models.BPE(vocab={"a": 0, "<unk>": 1}, merges=[], unk_token="<unk>"))
    assert length_bound(unfused.to_str()) == LengthBound(5, "chars")
