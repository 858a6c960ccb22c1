"""Structured outputs at the API: every request form maps to one StructuredOutputsParams,
and every invalid one is a 400 naming its field (compiled with llguidance at the
gateway, before anything is routed)."""

from __future__ import annotations

import json

import pytest

from rtpllm.api.errors import APIError
from rtpllm.api.params import chat_sampling_params, completion_sampling_params
from rtpllm.api.requests import ChatCompletionRequest, CompletionRequest, parse_body
from rtpllm.structured import StructuredOutputsParams

MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def chat(**fields: object) -> ChatCompletionRequest:
    return parse_body(ChatCompletionRequest, json.dumps({"model": "m", "messages": MSG, **fields}).encode())


def completion(**fields: object) -> CompletionRequest:
    return parse_body(CompletionRequest, json.dumps({"model": "m", "prompt": "hi", **fields}).encode())


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
                }
            },
            StructuredOutputsParams(json=SCHEMA),
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "description": "d", "schema": SCHEMA},
                }
            },
            StructuredOutputsParams(json=SCHEMA),
        ),
        ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
        ({"guided_json": json.dumps(SCHEMA)}, StructuredOutputsParams(json=SCHEMA)),
        ({"guided_choice": ["yes", "no"]}, StructuredOutputsParams(choice=["yes", "no"])),
        ({"guided_choice": []}, None),  # a default value some clients always send
        ({"guided_regex": r"\d{3}-[a-z]+"}, StructuredOutputsParams(regex=r"\d{3}-[a-z]+")),
        ({"guided_grammar": 'start: "a" | "b"'}, StructuredOutputsParams(grammar='start: "a" | "b"')),
        (
            {"guided_grammar": 'root ::= "yes" | "no"'},
            StructuredOutputsParams(grammar='root ::= "yes" | "no"'),
        ),
        ({"guided_regex": "a+", "guided_decoding_backend": "guidance"}, StructuredOutputsParams(regex="a+")),
        (
            {"guided_regex": "a+", "guided_decoding_backend": "llguidance"},
            StructuredOutputsParams(regex="a+"),
        ),
        ({"guided_regex": "a+", "guided_decoding_backend": "auto"}, StructuredOutputsParams(regex="a+")),
        ({"guided_decoding_backend": "guidance"}, None),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutputsParams(json=SCHEMA)),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutputsParams(json=SCHEMA)),
        ({"structured_outputs": {"regex": "[0-9]+"}}, StructuredOutputsParams(regex="[0-9]+")),
        ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutputsParams(choice=["a", "b"])),
        ({"structured_outputs": {"grammar": 'start: "x"'}}, StructuredOutputsParams(grammar='start: "x"')),
        ({"structured_outputs": {"json_object": True}}, StructuredOutputsParams(json_object=True)),
        (
            {
                "structured_outputs": {
                    "regex": "a",
                    "json": None,
                    "json_object": False,
                    "disable_fallback": True,
                }
            },
            StructuredOutputsParams(regex="a"),
        ),
    ],
)
def test_request_forms(fields: dict, expected: StructuredOutputsParams | None) -> None:
    assert chat_sampling_params(chat(**fields)).structured_outputs == expected
    assert completion_sampling_params(completion(**fields)).structured_outputs == expected


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"response_format": {"type": "structural_tag"}}, "response_format.type", "not supported"),
        ({"response_format": {}}, "response_format.type", "not supported"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "name and a schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format.json_schema.name",
            "name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": "yes"},
                }
            },
            "response_format.json_schema.strict",
            "boolean",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "extra": 1},
                }
            },
            "response_format.json_schema.extra",
            "Unrecognized",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
            "nope",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
            "response_format.json_schema.schema",
            "object",
        ),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_json": "[1, 2]"}, "guided_json", "schema object"),
        ({"guided_json": {"type": "integer", "minimum": 5, "maximum": 1}}, "guided_json", "minimum"),
        ({"guided_json": {"$ref": "#/$defs/missing"}}, "guided_json", "missing"),
        ({"guided_json": {"type": "string", "format": "no-such-format"}}, "guided_json", "no-such-format"),
        ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
        ({"guided_regex": ""}, "guided_regex", "non-empty"),
        ({"guided_choice": ["a", ""]}, "guided_choice", "non-empty strings"),
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", "undefined_rule"),
        (
            {"guided_regex": "a", "guided_decoding_backend": "xgrammar"},
            "guided_decoding_backend",
            "llguidance",
        ),
        ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend", "llguidance"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
        ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex", "not several"),
        (
            {"response_format": {"type": "json_object"}, "guided_choice": ["a"]},
            "guided_choice",
            "not several",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice", "not several"),
        (
            {"guided_regex": "a", "structured_outputs": {"regex": "b"}},
            "structured_outputs.regex",
            "not several",
        ),
        (
            {"structured_outputs": {"structural_tag": "x"}},
            "structured_outputs.structural_tag",
            "not supported",
        ),
        (
            {"structured_outputs": {"whitespace_pattern": " "}},
            "structured_outputs.whitespace_pattern",
            "not supported",
        ),
        ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex", "string"),
        ({"structured_outputs": {"choice": "a"}}, "structured_outputs.choice", "list of strings"),
        ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object", "boolean"),
        ({"structured_outputs": {"json": "{bad"}}, "structured_outputs.json", "not valid JSON"),
        ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs.grammar", ""),
    ],
)
def test_invalid_forms_are_400_naming_the_field(fields: dict, param: str, words: str) -> None:
    for build, req in ((chat_sampling_params, chat), (completion_sampling_params, completion)):
        with pytest.raises(APIError) as info:
            build(req(**fields))  # type: ignore[operator]
        assert info.value.status == 400
        assert info.value.param == param
        assert words in info.value.message


def test_wrong_types_are_400_at_parse() -> None:
    for fields, param in (({"guided_choice": "a"}, "guided_choice"), ({"guided_regex": 5}, "guided_regex")):
        with pytest.raises(APIError) as info:
            chat(**fields)
        assert info.value.status == 400 and info.value.param == param


def test_forced_tool_calls_leave_no_room_for_response_format() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(APIError) as info:
        fmt = {"type": "json_object"}
        chat_sampling_params(chat(tools=tools, tool_choice="required", response_format=fmt))
    assert info.value.param == "tool_choice"
    # "auto" constrains nothing: the response format applies (and no call can be read).
    params = chat_sampling_params(chat(tools=tools, response_format={"type": "json_object"}))
    assert params.structured_outputs == StructuredOutputsParams(json_object=True)
