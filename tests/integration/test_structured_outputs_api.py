"""Structured outputs end to end: the `openai` client -> gateway -> NATS -> workers with
the tiny random Llama (byte tokenizer). Random weights at temperature 1 would write
anything; the grammar makes every output match, streamed or not, for every sample."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.integration.support import MODEL_NAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CHAT = [{"role": "user", "content": "Describe a person."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
}
CHOICES = ["yes", "no", "not sure"]


def _valid_person(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"name", "age", "tags"}
        and isinstance(value["name"], str)
        and len(value["name"]) <= 8
        and 0 <= value["age"] <= 120
        and set(value["tags"]) <= {"a", "b"}
    )


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        n=2,
        temperature=1.0,
        max_tokens=120,
        response_format=fmt,  # type: ignore[arg-type]
    )
    assert len(r.choices) == 2
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        assert _valid_person(choice.message.content or "")
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        n=2,
        temperature=1.0,
        max_tokens=120,
        response_format=fmt,
        stream=True,  # type: ignore[arg-type]
    )
    texts = ["", ""]
    finishes: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert finishes == {0: "stop", 1: "stop"}
    assert all(_valid_person(t) for t in texts)


def test_guided_choice_via_extra_body(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        n=2,
        temperature=1.0,
        max_tokens=20,
        extra_body={"guided_choice": CHOICES},
    )
    assert [c.message.content in CHOICES for c in r.choices] == [True, True]
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, n=2, temperature=1.0, max_tokens=20, stream=True,
        extra_body={"guided_choice": CHOICES},
    )  # fmt: skip
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert all(t in CHOICES for t in texts)


def test_completions_guided_regex_and_structured_outputs(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL_NAME, prompt="The code is ", n=2, temperature=1.0, max_tokens=20,
        extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}},
    )  # fmt: skip
    assert all(re.fullmatch("[A-Z]{3}-[0-9]{2}", c.text) for c in r.choices)
    r = client.completions.create(
        model=MODEL_NAME,
        prompt="Answer: ",
        temperature=1.0,
        max_tokens=60,
        extra_body={"guided_json": SCHEMA},
    )
    assert _valid_person(r.choices[0].text)


def test_invalid_constraints_are_400_naming_the_field(http: httpx.Client) -> None:
    cases = [
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_json": {"type": "nope"}}, "guided_json"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format.json_schema.schema"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
        ({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ]  # fmt: skip
    for fields, param in cases:
        r = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": CHAT, **fields})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
