"""Request fields this server knows but honours only at some values.

Nothing a client asks for is silently ignored: a field we do not know at all is a 400
when the body is parsed (rtpllm.api.requests), and a known field set to a value we
cannot honour is a 400 naming it here, before anything runs. A field at its default
(`null`, `false`, `0`, `[]`), which some clients send for every field they know, is
always accepted. docs/serving.md lists every field with what it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rtpllm.api.errors import bad_request
from rtpllm.api.requests import ChatCompletionRequest, CompletionRequest, _SamplingFields


def _unset(value: Any) -> bool:
    return value is None or value == [] or value == {}


@dataclass(frozen=True)
class Rule:
    """`field` is accepted while `ok(value)`; otherwise 400 with `message`."""

    field: str
    ok: Callable[[Any], bool]
    message: str


_BOTH = (
    Rule("store", lambda v: not v, "store: true is not supported: this server keeps no completions."),
    Rule(
        "service_tier",
        lambda v: v in (None, "auto", "default"),
        "service_tier must be 'auto' or 'default': this server has one tier.",
    ),
    Rule(
        "priority",
        lambda v: v == 0,
        "priority must be 0: this server schedules requests first come, first served.",
    ),
    Rule("use_beam_search", lambda v: not v, "Beam search is not supported."),
    Rule(
        "length_penalty", lambda v: v == 1.0, "length_penalty applies to beam search, which is not supported."
    ),
    Rule(
        "spaces_between_special_tokens",
        lambda v: v,
        "spaces_between_special_tokens: false is not supported (special tokens are decoded as the tokenizer decodes them).",
    ),
    Rule("bad_words", _unset, "bad_words is not supported; logit_bias bans single tokens."),
    Rule(
        "logits_processors",
        _unset,
        "Custom logits processors are not supported; logit_bias and allowed_token_ids are.",
    ),
    Rule(
        "cache_salt",
        lambda v: v is None,
        "cache_salt is not supported: the prefix cache is shared by every request for the model.",
    ),
    Rule(
        "kv_transfer_params",
        _unset,
        "kv_transfer_params is vLLM's; disaggregation here is the server's own decision.",
    ),
    Rule("vllm_xargs", _unset, "vllm_xargs (custom extension arguments) is not supported."),
)

_CHAT = (
    Rule("modalities", lambda v: v is None or v == ["text"], "Only the text modality is supported."),
    Rule("audio", lambda v: v is None, "Audio output is not supported."),
    Rule("prediction", lambda v: v is None, "Predicted outputs are not supported."),
    Rule("web_search_options", lambda v: v is None, "Web search is not supported."),
    Rule("functions", _unset, "Function calling (functions) is not supported."),
    Rule(
        "function_call", lambda v: v in (None, "none"), "Function calling (function_call) is not supported."
    ),
    Rule("reasoning_effort", lambda v: v is None, "reasoning_effort is not supported by this model."),
    Rule("verbosity", lambda v: v is None, "verbosity is not supported; use max_completion_tokens."),
    Rule(
        "chat_template",
        lambda v: v is None,
        "A chat template in the request is not accepted (it runs on the server); the model's own template is used.",
    ),
    Rule(
        "add_special_tokens",
        lambda v: not v,
        "add_special_tokens: true is not supported for chat: the chat template writes the model's special tokens.",
    ),
    Rule("mm_processor_kwargs", _unset, "mm_processor_kwargs is not supported."),
    Rule(
        "include_reasoning",
        lambda v: v,
        "include_reasoning: false is not supported: this server does not separate reasoning from content.",
    ),
)

_COMPLETION = (
    Rule("prompt_embeds", lambda v: v is None, "prompt_embeds is not supported; send text or token ids."),
)

_MAX_METADATA = 16  # OpenAI's limits on metadata
_MAX_ID_CHARS = 256


def rules(req: _SamplingFields) -> tuple[Rule, ...]:
    specific = _CHAT if isinstance(req, ChatCompletionRequest) else _COMPLETION
    return _BOTH + specific


def check_supported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """400 naming the first field set to a value this server cannot honour, or set
    where it would have no effect."""
    for rule in rules(req):
        if not rule.ok(getattr(req, rule.field)):
            raise bad_request(rule.message, rule.field)
    if req.stream_options is not None and not req.stream:
        raise bad_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
        )
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs are not available when stream is true.", "prompt_logprobs")
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens < 1:
        raise bad_request("truncate_prompt_tokens must be at least 1.", "truncate_prompt_tokens")
    if req.request_id is not None and not _printable_id(req.request_id):
        raise bad_request(
            f"request_id must be 1 to {_MAX_ID_CHARS} printable ASCII characters without spaces.",
            "request_id",
        )
    if req.metadata is not None:
        _check_metadata(req.metadata)
    if isinstance(req, ChatCompletionRequest):
        _check_chat(req)


def _check_chat(req: ChatCompletionRequest) -> None:
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is supported by /v1/completions; for chat it must equal n.", "best_of")
    if (
        req.continue_final_message
        and "add_generation_prompt" in req.model_fields_set
        and req.add_generation_prompt
    ):
        # Unset, add_generation_prompt yields to continue_final_message; set, it conflicts.
        raise bad_request(
            "Cannot set both continue_final_message and add_generation_prompt to true.",
            "continue_final_message",
        )


def _check_metadata(metadata: dict[str, str]) -> None:
    if len(metadata) > _MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise bad_request(
            "metadata holds at most 16 pairs, keys of at most 64 characters and values of at most 512.",
            "metadata",
        )


def _printable_id(value: str) -> bool:
    return 0 < len(value) <= _MAX_ID_CHARS and value.isascii() and value.isprintable() and " " not in value
