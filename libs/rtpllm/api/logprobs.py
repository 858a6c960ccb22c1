"""Logprobs in OpenAI's two formats: chat (`content: [{token, logprob, bytes,
top_logprobs}]`) and legacy completions (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`); and vLLM's `prompt_logprobs` (token id -> logprob, rank, decoded
token, per prompt position)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from rtpllm.api.responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)
from rtpllm.protocol.messages import PositionLogprobs, TokenLogprob
from rtpllm.tokenizer import Tokenizer
from rtpllm.tokenizer.byte_tokenizer import byte_alphabet

# JSON has no -inf; OpenAI-compatible servers report this floor instead.
MIN_LOGPROB = -9999.0
_BYTE_OF_CHAR = {ch: b for b, ch in enumerate(byte_alphabet())}
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _lp(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB


def _top(position: PositionLogprobs, k: int) -> list[TokenLogprob]:
    """The k best entries by rank (the sampled token is first in `position` whatever its rank)."""
    if k <= 0:
        return []
    return sorted(position, key=lambda e: e.rank)[:k]


class TokenText:
    """Token strings and bytes for logprobs, from the gateway's tokenizer."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._tok = tokenizer

    def text(self, entry: TokenLogprob) -> str:
        if entry.text is not None:
            return entry.text
        if self._tok is not None:
            return self._tok.decode([entry.token_id], skip_special_tokens=False)
        return f"token_id:{entry.token_id}"

    def token_bytes(self, entry: TokenLogprob, text: str) -> list[int]:
        """The token's exact bytes. Its decoded text is exact unless it is part of a
        multi-byte character (decoded alone it is U+FFFD); then the vocabulary piece
        says which bytes it holds (byte-level BPE alphabet or a <0xNN> fallback piece)."""
        if "\ufffd" in text and self._tok is not None:
            piece = self._tok.id_to_token(entry.token_id)
            if piece is not None:
                match = _BYTE_FALLBACK.match(piece)
                if match:
                    return [int(match.group(1), 16)]
                if all(ch in _BYTE_OF_CHAR for ch in piece):
                    return [_BYTE_OF_CHAR[ch] for ch in piece]
        return list(text.encode("utf-8"))

    def chat(self, positions: Sequence[PositionLogprobs], top_k: int) -> ChatLogprobs:
        content = []
        for position in positions:
            chosen = position[0]
            text = self.text(chosen)
            tops = []
            for e in _top(position, top_k):
                t = self.text(e)
                tops.append(TopLogprob(t, _lp(e.logprob), self.token_bytes(e, t)))
            content.append(ChatTokenLogprob(text, _lp(chosen.logprob), self.token_bytes(chosen, text), tops))
        return ChatLogprobs(content=content)

    def prompt(self, positions: Sequence[PositionLogprobs | None], top_k: int) -> PromptLogprobs:
        """vLLM's prompt_logprobs: at each position the prompt's own token and the top_k
        most likely ones, by token id."""
        out: PromptLogprobs = []
        for position in positions:
            if position is None:
                out.append(None)
                continue
            entries = {position[0].token_id: self._prompt_entry(position[0])}
            for e in _top(position, top_k):
                entries.setdefault(e.token_id, self._prompt_entry(e))
            out.append(entries)
        return out

    def _prompt_entry(self, entry: TokenLogprob) -> PromptLogprob:
        return PromptLogprob(_lp(entry.logprob), entry.rank, self.text(entry))


class TokenIdText(TokenText):
    """vLLM's `return_tokens_as_token_ids`: every token is named `token_id:<id>`, which
    identifies even a token that is not valid UTF-8 on its own."""

    def text(self, entry: TokenLogprob) -> str:
        return f"token_id:{entry.token_id}"

    def token_bytes(self, entry: TokenLogprob, text: str) -> list[int]:
        return list(text.encode())


class CompletionLogprobsBuilder:
    """Builds legacy-completions logprobs incrementally (text_offset continues across
    stream chunks, starting after the echoed prompt)."""

    def __init__(self, token_text: TokenText, top_k: int, offset: int = 0) -> None:
        self._tt = token_text
        self._k = top_k
        self.offset = offset

    def build(self, positions: Sequence[PositionLogprobs | None], first_token_id: int | None = None) -> CompletionLogprobs:
        """Logprobs of consecutive positions. A None position (the first prompt token,
        which has no logprob) needs `first_token_id` to name it."""
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for position in positions:
            if position is None:
                text = self._tt.text(TokenLogprob(first_token_id if first_token_id is not None else -1, 0.0, 0))
                out.tokens.append(text)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                chosen = position[0]
                text = self._tt.text(chosen)
                out.tokens.append(text)
                out.token_logprobs.append(_lp(chosen.logprob))
                top = {self._tt.text(e): _lp(e.logprob) for e in _top(position, self._k)}
                top.setdefault(text, _lp(chosen.logprob))  # OpenAI lists the chosen token too
                out.top_logprobs.append(top)
            out.text_offset.append(self.offset)
            self.offset += len(text)
        return out
