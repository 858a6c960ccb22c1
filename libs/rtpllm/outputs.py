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
class KVHandoff:
    """Where a prefill-only request's KV is (disaggregation, prefill side): blocks of the
    engine's pool, in order, of which the first `num_tokens` tokens are written. The
    finished output also carries the first token's raw logprobs row, for the decode side."""

    block_ids: list[int]
    num_tokens: int
    first_token_logprobs: tuple[float, int, list[int], list[float]] | None = None


@dataclass(frozen=True)
class KVReservation:
    """Blocks a decode engine reserved for a remote prefill (disaggregation, decode
    side). The engine already holds the first `skip_blocks` blocks of the prompt (its
    prefix cache, `num_cached_tokens` tokens); the prefill instance writes the prompt's
    remaining blocks into `block_ids`, in order."""

    block_ids: list[int]
    skip_blocks: int
    num_cached_tokens: int


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
    kv: KVHandoff | None = None  # prefill-only requests: their KV so far
