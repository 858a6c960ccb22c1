"""OpenAI request bodies (pydantic, strict types: `"n": "2"` is a 400, not a 2).

Value ranges are checked where they are defined, by SamplingParams (see params.py), so
the API and the engine cannot disagree. An unknown field is a 400 naming it, as OpenAI
answers ("Unrecognized request argument supplied: foo"): a field we do not know is a
feature we do not have, and ignoring it would return 200 with something else than was
asked. Every known field is honoured or, at a value we cannot honour, refused with a
400 naming it (rtpllm.api.unsupported). Extensions beyond OpenAI use vLLM's names.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from rtpllm.api.errors import APIError, bad_request


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk
    include_obfuscation: bool | None = None  # OpenAI's padding against length side channels: none is sent


class _SamplingFields(_Strict):
    model: str | None = None  # None: the gateway's model (OpenAI requires it; we are lenient)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # false: no speculative decoding for this request (docs/speculative_decoding.md);
    # outputs are the same either way, only speed differs.
    speculative: bool = True
    # OpenAI fields honoured only at some values (rtpllm.api.unsupported says which).
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    # More of vLLM's extensions: honoured, or refused unless at their defaults.
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    request_id: str | None = None
    return_tokens_as_token_ids: bool | None = None
    priority: int = 0
    use_beam_search: bool = False
    length_penalty: float = 1.0
    spaces_between_special_tokens: bool = True
    bad_words: list[str] | None = None
    logits_processors: list[Any] | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    # Structured outputs (rtpllm.api.structured): OpenAI's response_format, vLLM's
    # guided_* fields and its newer structured_outputs object; at most one constraint.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    """One message; content is a string or a list of text parts."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # the assistant's (rtpllm.api.tools)
    tool_call_id: str | None = None  # a tool message's: the call it answers


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    # Tool calling (rtpllm.api.tools).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Chat rendering (vLLM's extensions).
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    add_special_tokens: bool = False
    mm_processor_kwargs: dict[str, Any] | None = None
    echo: bool = False  # vLLM: the reply starts with the last message when it is the assistant's
    best_of: int | None = None
    include_reasoning: bool = True
    # OpenAI chat fields honoured only at some values (rtpllm.api.unsupported).
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True  # vLLM: the tokenizer's BOS etc. around a text prompt
    prompt_embeds: Any = None


def parse_body(model: type[_Strict], body: bytes) -> Any:
    """Validate a JSON body; malformed JSON and wrong types become a 400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _to_api_error(exc) from None


def _to_api_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return bad_request(f"The request body is not valid JSON: {first['msg']}")
    if first["type"] == "model_type" and not first["loc"]:
        return bad_request("The request body must be a JSON object.")
    if first["type"] == "extra_forbidden":
        # OpenAI's words and param for a field it does not know.
        name = ".".join(str(p) for p in first["loc"])
        return bad_request(f"Unrecognized request argument supplied: {name}", name)
    # Union members add their type names to loc ("prompt.str"); keep the field path.
    loc = [str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_NAMES))]
    param = ".".join(loc) or None
    return bad_request(f"Invalid value for '{param}': {first['msg']}" if param else first["msg"], param)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "StreamOptions", "ChatMessage"}
