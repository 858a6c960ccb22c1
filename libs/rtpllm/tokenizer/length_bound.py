"""A provable lower bound on a text's token count from its length alone.

Used to refuse a prompt that cannot fit the context window before paying for its
tokenization (seconds for megabytes). Characters can be *fewer* than tokens (a CJK
character is often 2-3 byte-level tokens), so length is never an upper bound; the only
sound early refusal comes from the other side: if no token can stand for more than `L`
units of the input, a text of `n` units has at least `ceil(n / L)` tokens.

The unit is the UTF-8 byte for byte-level BPE (each character of a vocabulary entry is
one byte) and the character otherwise; `L` is the longest vocabulary entry or added
token in that unit. The bound holds only if every unit of the input ends up inside some
token, which is checked on the tokenizer's own description (`tokenizer.json`):

- the model is BPE, and a unit outside the vocabulary cannot swallow a run of others:
  byte-level (a byte with no vocabulary entry is not counted: such bytes vanish, as
  SmolLM2 drops some control characters), byte fallback, or an unknown token that is not
  fused across characters (an unknown character is then one token);
- the normalizer can only keep or lengthen the text in that unit (prepend, a literal
  replace by something no shorter; for characters also lowercase and decomposition,
  which can shorten the bytes but not the characters);
- the pre-tokenizer only splits, never drops (byte-level, metaspace, digits, unicode
  scripts, and split or punctuation unless their behaviour is "removed");
- no added token strips whitespace around itself (lstrip/rstrip would absorb any run).

Anything else (WordPiece's [UNK] for a whole long word, whitespace-dropping
pre-tokenizers, NFC composition, ...) gives no bound, and prompts are only checked after
tokenization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rtpllm.tokenizer.byte_tokenizer import byte_alphabet

_SAFE_NORMALIZERS = {"bytes": {"Prepend"}, "chars": {"Prepend", "Lowercase", "NFD", "NFKD"}}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"}
_SPLITTERS = {"Split", "Punctuation"}  # safe unless their behaviour drops the match


@dataclass(frozen=True)
class LengthBound:
    """No token stands for more than `per_token` units (`bytes` or `chars`) of input;
    `dropped`: bytes that have no token (byte-level) and so may vanish."""

    per_token: int
    unit: str
    dropped: bytes = b""

    def min_tokens(self, text: str) -> int:
        """The fewest tokens `text` can have (before special tokens are added)."""
        if self.unit == "chars":
            n = len(text)
        else:
            n = len(text.encode("utf-8", "surrogatepass").translate(None, self.dropped))
        return -(-n // self.per_token)


def length_bound(tokenizer_json: str) -> LengthBound | None:
    """The bound for a tokenizer (its `tokenizer.json` text), or None when its structure
    does not guarantee one (see the module docstring)."""
    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    vocab: dict[str, int] = model.get("vocab") or {}
    if model.get("type") != "BPE" or not vocab:
        return None
    byte_level = _uses(spec.get("pre_tokenizer"), "ByteLevel") or _uses(spec.get("normalizer"), "ByteLevel")
    unit = "bytes" if byte_level else "chars"
    if not _normalizer_safe(spec.get("normalizer"), unit) or not _pre_tokenizer_safe(
        spec.get("pre_tokenizer")
    ):
        return None
    added = spec.get("added_tokens") or []
    if any(tok.get("lstrip") or tok.get("rstrip") for tok in added):
        return None
    dropped = b""
    if byte_level:
        dropped = bytes(b for b, ch in enumerate(byte_alphabet()) if ch not in vocab)
    elif not model.get("byte_fallback") and (model.get("unk_token") is None or model.get("fuse_unk")):
        return None  # an unknown character vanishes, or a run of them becomes one token
    longest = max(len(piece) for piece in vocab)  # byte-level: one character per byte
    added_lengths = [_length(tok.get("content", ""), unit) for tok in added]
    return LengthBound(max(longest, *added_lengths, 1), unit, dropped)


def _length(text: str, unit: str) -> int:
    return len(text.encode()) if unit == "bytes" else len(text)


def _items(spec: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return list(spec.get(key) or [])


def _normalizer_safe(spec: dict[str, Any] | None, unit: str) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_normalizer_safe(item, unit) for item in _items(spec, "normalizers"))
    if kind == "Replace":
        literal = (spec.get("pattern") or {}).get("String")
        if not isinstance(literal, str) or not literal:
            return False  # a regex may match and delete anything
        return _length(spec.get("content", ""), unit) >= _length(literal, unit)
    if kind == "ByteLevel":
        return unit == "bytes"  # maps each byte to one character
    return kind in _SAFE_NORMALIZERS[unit]


def _pre_tokenizer_safe(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_safe(item) for item in _items(spec, "pretokenizers"))
    if kind in _SPLITTERS:
        return spec.get("behavior") != "Removed"
    return kind in _SAFE_PRE_TOKENIZERS


def _uses(spec: dict[str, Any] | None, kind: str) -> bool:
    if spec is None:
        return False
    if spec.get("type") == kind:
        return True
    return any(_uses(item, kind) for item in _items(spec, "normalizers") + _items(spec, "pretokenizers"))
