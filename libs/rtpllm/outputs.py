"""What the engine returns: per-request outputs, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


# One generated (or prompt) position: token id -> its logprob, the chosen token included.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One of the n samples of a request.

    From the async engine these are deltas (new tokens/text since the last output);
    `LLM.generate` returns them accumulated.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt: str | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
