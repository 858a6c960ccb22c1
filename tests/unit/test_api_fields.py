"""Every OpenAI and vLLM request field is honoured or refused with a 400 naming it;
none is silently ignored.

Each table row is a field with a sample value, and what happens: `HONOURED` (accepted;
with a check of its effect on the engine's parameters where it has one: the rest,
rendering and response fields, are checked end to end in
tests/integration/test_openai_extras.py) or `REFUSED` (400, `param` the field). The
tables must cover every field the request models declare, so a new field cannot land
unclassified. Structured outputs belong to their own work (`OWNED`): those only have
to be honoured or refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from rtpllm.api.errors import APIError
from rtpllm.api.params import chat_sampling_params, completion_sampling_params
from rtpllm.api.requests import ChatCompletionRequest, CompletionRequest, parse_body
from rtpllm.sampling_params import SamplingParams

HONOURED, REFUSED, EITHER = "honoured", "refused", "either"
Check = Callable[[SamplingParams], bool] | None

OWNED = {  # structured outputs and tool calling: honoured or refused, as that work decides
    "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structural_tag",
    "guided_decoding_backend", "guided_whitespace_pattern", "structured_outputs",
}  # fmt: skip
PARAMETERS = {"type": "object", "properties": {"x": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": PARAMETERS}}]


def _forced(name: str | None = None) -> Callable[[SamplingParams], bool]:
    """A check: the tool calls are forced by a grammar (naming the function, if given)."""

    def check(p: SamplingParams) -> bool:
        grammar = p.structured_outputs.grammar if p.structured_outputs is not None else None
        return grammar is not None and (name is None or f'"const": "{name}"' in grammar)

    return check

# (field, sample value, expectation, check of the engine parameters)
COMMON: list[tuple[str, Any, str, Check]] = [
    # OpenAI
    ("model", "m", HONOURED, None),
    ("frequency_penalty", 0.5, HONOURED, lambda p: p.frequency_penalty == 0.5),
    ("presence_penalty", -0.5, HONOURED, lambda p: p.presence_penalty == -0.5),
    ("logit_bias", {"5": 10, "7": -100}, HONOURED, lambda p: p.logit_bias == {5: 10.0, 7: -100.0}),
    ("max_tokens", 5, HONOURED, lambda p: p.max_tokens == 5),
    ("n", 3, HONOURED, lambda p: p.n == 3),
    ("seed", 7, HONOURED, lambda p: p.seed == 7),
    ("stop", ["x", "y"], HONOURED, lambda p: p.stop == ["x", "y"]),
    ("stream", True, HONOURED, None),
    ("temperature", 0.25, HONOURED, lambda p: p.temperature == 0.25),
    ("top_p", 0.5, HONOURED, lambda p: p.top_p == 0.5),
    ("user", "user-1", HONOURED, None),  # an identifier: accepted
    ("metadata", {"k": "v"}, HONOURED, None),  # accepted and validated; nothing is stored
    ("store", True, REFUSED, None),
    ("service_tier", "flex", REFUSED, None),
    # vLLM
    ("top_k", 5, HONOURED, lambda p: p.top_k == 5),
    ("min_p", 0.1, HONOURED, lambda p: p.min_p == 0.1),
    ("repetition_penalty", 1.2, HONOURED, lambda p: p.repetition_penalty == 1.2),
    ("stop_token_ids", [5], HONOURED, lambda p: p.stop_token_ids == [5]),
    ("include_stop_str_in_output", True, HONOURED, lambda p: p.include_stop_str_in_output),
    ("ignore_eos", True, HONOURED, lambda p: p.ignore_eos),
    ("min_tokens", 2, HONOURED, lambda p: p.min_tokens == 2),
    ("skip_special_tokens", False, HONOURED, lambda p: not p.skip_special_tokens),
    ("allowed_token_ids", [1, 2], HONOURED, lambda p: p.allowed_token_ids == [1, 2]),
    # rtpllm
    ("speculative", False, HONOURED, lambda p: p.speculative is False),
    ("prompt_logprobs", 2, HONOURED, lambda p: p.prompt_logprobs == 2),
    ("truncate_prompt_tokens", 4, HONOURED, None),
    ("request_id", "my-request-1", HONOURED, None),
    ("return_tokens_as_token_ids", True, HONOURED, None),
    ("use_beam_search", True, REFUSED, None),
    ("length_penalty", 0.5, REFUSED, None),
    ("spaces_between_special_tokens", False, REFUSED, None),
    ("bad_words", ["x"], REFUSED, None),
    ("priority", 1, REFUSED, None),
    ("logits_processors", ["my.module.Processor"], REFUSED, None),
    ("cache_salt", "salt", REFUSED, None),
    ("kv_transfer_params", {"do_remote_decode": True}, REFUSED, None),
    ("vllm_xargs", {"x": 1}, REFUSED, None),
    # Not a field of either API (nor of newer vLLMs' we lack): refused as unknown.
    ("return_token_ids", True, REFUSED, None),
    ("no_such_field", 1, REFUSED, None),
]

CHAT: list[tuple[str, Any, str, Check]] = [
    ("max_completion_tokens", 6, HONOURED, lambda p: p.max_tokens == 6),
    ("logprobs", True, HONOURED, lambda p: p.logprobs == 0),
    ("top_logprobs", 3, HONOURED, lambda p: p.logprobs == 3),
    ("stream_options", {"include_usage": True, "continuous_usage_stats": True}, HONOURED, None),
    ("add_generation_prompt", False, HONOURED, None),
    ("continue_final_message", True, HONOURED, None),
    ("chat_template_kwargs", {"enable_thinking": False}, HONOURED, None),
    ("documents", [{"title": "t", "text": "x"}], HONOURED, None),
    ("echo", True, HONOURED, None),
    ("include_reasoning", True, HONOURED, None),
    ("modalities", ["text"], HONOURED, None),
    ("prompt_cache_key", "k", HONOURED, None),  # prefix caching is automatic
    ("safety_identifier", "user-1", HONOURED, None),
    # Tools: "auto" reads calls from unconstrained output; "required" and a named
    # function are forced by a grammar (rtpllm.api.tools).
    ("tools", TOOLS, HONOURED, lambda p: p.structured_outputs is None),
    ("tool_choice", "required", HONOURED, _forced()),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}, HONOURED, _forced("f")),
    ("tool_choice", "none", HONOURED, lambda p: p.structured_outputs is None),
    ("tool_choice", "sometimes", REFUSED, None),
    ("parallel_tool_calls", False, HONOURED, None),
    ("best_of", 2, REFUSED, None),  # /v1/completions only
    ("functions", [{"name": "f"}], REFUSED, None),
    ("function_call", "auto", REFUSED, None),
    ("audio", {"voice": "alloy", "format": "wav"}, REFUSED, None),
    ("prediction", {"type": "content", "content": "x"}, REFUSED, None),
    ("web_search_options", {}, REFUSED, None),
    ("reasoning_effort", "low", REFUSED, None),
    ("verbosity", "low", REFUSED, None),
    ("chat_template", "{{ messages }}", REFUSED, None),
    ("add_special_tokens", True, REFUSED, None),
    ("mm_processor_kwargs", {"x": 1}, REFUSED, None),
    ("include_reasoning", False, REFUSED, None),
    ("suffix", "x", REFUSED, None),  # completions' field: unknown to chat
]

COMPLETION: list[tuple[str, Any, str, Check]] = [
    ("logprobs", 2, HONOURED, lambda p: p.logprobs == 2),
    ("echo", True, HONOURED, None),
    ("best_of", 3, HONOURED, lambda p: p.n == 3 and p.logprobs == 0),
    ("stream_options", {"include_usage": True, "continuous_usage_stats": True}, HONOURED, None),
    ("add_special_tokens", False, HONOURED, None),
    ("suffix", "x", REFUSED, None),
    ("prompt_embeds", "AAAA", REFUSED, None),
    ("messages", [{"role": "user", "content": "hi"}], REFUSED, None),  # chat's field
]

# Accepted at these values only; other values of the same fields are refused above.
DEFAULTS_ACCEPTED: list[tuple[str, Any]] = [
    ("service_tier", "auto"),
    ("service_tier", "default"),
    ("store", False),
    ("priority", 0),
    ("use_beam_search", False),
    ("length_penalty", 1.0),
    ("spaces_between_special_tokens", True),
    ("bad_words", []),
    ("cache_salt", None),
    ("functions", None),
    ("function_call", "none"),
    ("tools", []),
    ("tool_choice", "none"),
    ("tool_choice", "auto"),
    ("parallel_tool_calls", True),
    ("audio", None),
    ("modalities", None),
]

# Fields that mean something only next to another one.
COMPANIONS: dict[str, dict[str, Any]] = {
    "stream_options": {"stream": True},
    "top_logprobs": {"logprobs": True},
    "tool_choice": {"tools": TOOLS},
    "parallel_tool_calls": {"tools": TOOLS},
}


def _body(base: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    return {**base, **COMPANIONS.get(field, {}), field: value}


def _run(endpoint: str, body: dict[str, Any]) -> SamplingParams:
    raw = json.dumps(body).encode()
    if endpoint == "chat":
        return chat_sampling_params(parse_body(ChatCompletionRequest, raw))
    return completion_sampling_params(parse_body(CompletionRequest, raw))


BASES = {"chat": {"messages": [{"role": "user", "content": "hi"}]}, "completions": {"prompt": "hi"}}
CASES = [("chat", *row) for row in COMMON + CHAT] + [("completions", *row) for row in COMMON + COMPLETION]


@pytest.mark.parametrize(
    ("endpoint", "field", "value", "expect", "check"), CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES]
)
def test_every_field_is_honoured_or_refused_by_name(
    endpoint: str, field: str, value: Any, expect: str, check: Check
) -> None:
    body = _body(BASES[endpoint], field, value)
    if expect == REFUSED:
        with pytest.raises(APIError) as info:
            _run(endpoint, body)
        assert info.value.status == 400
        assert info.value.param == field, info.value.body()
        return
    params = _run(endpoint, body)
    if check is not None:
        assert check(params), params


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize(("field", "value"), DEFAULTS_ACCEPTED)
def test_fields_are_accepted_at_the_values_honoured(endpoint: str, field: str, value: Any) -> None:
    model = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
    if field not in model.model_fields:
        pytest.skip(f"{field} is not a {endpoint} field")
    _run(endpoint, _body(BASES[endpoint], field, value))


@pytest.mark.parametrize("field", sorted(OWNED))
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_owned_fields_are_honoured_or_refused_by_name(endpoint: str, field: str) -> None:
    samples = {
        "response_format": {"type": "json_object"},
        "guided_json": {"type": "object"},
        "guided_regex": "[a-z]+",
        "guided_choice": ["a", "b"],
        "guided_grammar": 'root ::= "a"',
        "structural_tag": "{}",
        "guided_decoding_backend": "xgrammar",
        "guided_whitespace_pattern": " ",
        "structured_outputs": {"choice": ["a", "b"]},
    }
    try:
        _run(endpoint, _body(BASES[endpoint], field, samples[field]))
    except APIError as exc:
        assert exc.status == 400 and exc.param is not None and exc.param.split(".")[0] == field, exc.body()


@pytest.mark.parametrize(
    ("model", "tables"), [(ChatCompletionRequest, COMMON + CHAT), (CompletionRequest, COMMON + COMPLETION)]
)
def test_the_tables_cover_every_declared_field(model: type, tables: list) -> None:
    covered = {row[0] for row in tables} | OWNED | {"messages", "prompt"}
    missing = set(model.model_fields) - covered
    assert not missing, f"classify these fields in the tables: {sorted(missing)}"


def test_unknown_field_is_openais_error() -> None:
    with pytest.raises(APIError) as info:
        parse_body(ChatCompletionRequest, b'{"messages": [], "frobnicate": 1}')
    assert info.value.body()["error"] == {
        "message": "Unrecognized request argument supplied: frobnicate",
        "type": "invalid_request_error",
        "param": "frobnicate",
        "code": None,
    }
    with pytest.raises(APIError) as info:
        parse_body(CompletionRequest, b'{"prompt": "x", "stream": true, "stream_options": {"bogus": true}}')
    assert info.value.param == "stream_options.bogus"


@pytest.mark.parametrize(
    ("endpoint", "extra", "param"),
    [
        ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ("chat", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ("completions", {"prompt_logprobs": 0, "stream": True}, "prompt_logprobs"),
        ("chat", {"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
        ("chat", {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ("chat", {"request_id": "has space"}, "request_id"),
        ("chat", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ("completions", {"logit_bias": {"1": 100.5}}, "logit_bias"),
        ("completions", {"logit_bias": {"-1": 1}}, "logit_bias"),
        ("completions", {"max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ("chat", {"tool_choice": "required"}, "tool_choice"),  # without tools
        ("chat", {"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ],
)
def test_combinations_refused_by_name(endpoint: str, extra: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        _run(endpoint, {**BASES[endpoint], **extra})
    assert info.value.status == 400 and info.value.param == param


def test_continue_final_message_without_add_generation_prompt() -> None:
    # add_generation_prompt left unset yields to continue_final_message.
    _run("chat", {**BASES["chat"], "continue_final_message": True})


def test_echo_with_max_tokens_0_runs_one_token_for_the_prompt_logprobs() -> None:
    p = _run("completions", {"prompt": "hi", "echo": True, "max_tokens": 0, "logprobs": 2})
    assert (p.max_tokens, p.prompt_logprobs, p.logprobs) == (1, 2, 2)
    # vLLM's prompt_logprobs and echo's logprobs share one run: the larger count.
    p = _run("completions", {"prompt": "hi", "echo": True, "logprobs": 1, "prompt_logprobs": 4})
    assert p.prompt_logprobs == 4
