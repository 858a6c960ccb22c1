"""The `usage` of streamed chunks, as `stream_options` asks for it.

- nothing: chunks have no `usage` key at all (OpenAI's default);
- `include_usage`: every chunk has `"usage": null` and a last chunk with empty
  `choices` carries the totals (OpenAI);
- `continuous_usage_stats` (vLLM): every chunk carries the running totals so far
  (prompt tokens, tokens generated up to and including that chunk), and the last
  chunk the final totals with cached tokens. It implies `include_usage`, as in vLLM,
  whose `include_usage` defaults to true.
"""

from __future__ import annotations

from msgspec import UNSET, UnsetType

from rtpllm.api.requests import StreamOptions
from rtpllm.api.responses import UsageInfo, usage_info
from rtpllm.protocol.messages import Usage


class StreamUsage:
    def __init__(self, options: StreamOptions | None, prompt_tokens: int) -> None:
        self.continuous = bool(options and options.continuous_usage_stats)
        self.include = bool(options and options.include_usage) or self.continuous
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def add(self, tokens: int) -> None:
        """Tokens generated since the last call."""
        self.completion_tokens += tokens

    def chunk(self) -> UsageInfo | None | UnsetType:
        """The `usage` of a content chunk."""
        if self.continuous:
            return usage_info(self.prompt_tokens, self.completion_tokens, None)
        return None if self.include else UNSET

    def final(self, total: Usage, completion_tokens: int | None = None) -> UsageInfo | None:
        """The last chunk's usage (None: no usage chunk). `completion_tokens` overrides
        the engine's count (echo with max_tokens 0 reports none)."""
        if not self.include:
            return None
        done = total.completion_tokens if completion_tokens is None else completion_tokens
        return usage_info(total.prompt_tokens, done, total.cached_tokens)
