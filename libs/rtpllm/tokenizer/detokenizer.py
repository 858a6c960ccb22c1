"""Incremental detokenization that never emits a broken UTF-8 sequence.

Byte-level BPE splits multi-byte characters across tokens; decoding a suffix alone
gives U+FFFD. We decode a small window ending at the new token and emit only the text
that grew past the window's previously read part, and nothing while the window ends in
an incomplete character.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Tokens of context kept before the unread part: enough for tokenizers whose decoding of
# a token depends on its left neighbour (SentencePiece's leading-space rule).
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        decode: Callable[[Sequence[int], bool], str],
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._decode = decode
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def step(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read], self._skip)
        full_text = self._decode(self._ids[self._prefix :], self._skip)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end of a request (a truncated character)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read], self._skip)
        full_text = self._decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
