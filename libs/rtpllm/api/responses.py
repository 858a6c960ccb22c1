"""OpenAI response and stream-chunk objects, as msgspec Structs (encoding them is on the
hot path of every streamed token).

Fields OpenAI sends as `null` are plain `X | None`; fields it leaves out are `UNSET`
(msgspec omits them), e.g. `usage` on chunks unless stream_options.include_usage.
"""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class UsageInfo(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Left out of a stream's running totals (continuous_usage_stats): cached tokens are
    # known only when the request ends.
    prompt_tokens_details: PromptTokensDetails | UnsetType = UNSET


def usage_info(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> UsageInfo:
    details = PromptTokensDetails(cached_tokens) if cached_tokens is not None else UNSET
    return UsageInfo(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, details)


class PromptLogprob(msgspec.Struct):
    """One entry of vLLM's `prompt_logprobs` (a list, per prompt position, of token id ->
    this; None for the first position, which has no logprob)."""

    logprob: float
    rank: int | None
    decoded_token: str | None


PromptLogprobs = list[dict[int, PromptLogprob] | None]


# -- chat ------------------------------------------------------------------------------


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class ChatMessageOut(msgspec.Struct):
    role: str
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET  # only when the model called tools


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None = None  # vLLM extension: the stop string or token id that matched


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    object: str = "chat.completion"
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET  # vLLM extension, when asked for


class FunctionDelta(msgspec.Struct):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class ToolCallDelta(msgspec.Struct):
    """A streamed call: its first delta has `id`, `type` and `function.name` (and
    `arguments: ""`); later ones only pieces of `function.arguments`."""

    index: int
    function: FunctionDelta
    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET


class ChatDelta(msgspec.Struct):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None | UnsetType = UNSET


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: UsageInfo | None | UnsetType = UNSET


# -- completions -----------------------------------------------------------------------


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None | UnsetType = UNSET
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET  # vLLM extension, when asked for


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    system_fingerprint: str | None = None
    usage: UsageInfo | None | UnsetType = UNSET


# -- models ----------------------------------------------------------------------------


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "rtpllm"
    object: str = "model"
    max_model_len: int | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


_encoder = msgspec.json.Encoder()


def to_json(obj: msgspec.Struct) -> bytes:
    return _encoder.encode(obj)
