"""Tool calling end to end: the `openai` SDK's tool-calling flow against a stack serving a
tiny random model with a Qwen2-style and with a Llama-3.1-style tool template
(tests/tool_templates.py). A call is returned (tool_choice "required" or a named
function: the grammar makes a random model write one), the tool results go back in a
follow-up with the assistant's tool_calls message and tool messages, and the final
answer comes (tool_choice "none", and "auto"), streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.integration.support import client_for, http_client, running_stack
from tests.tool_templates import write_tools_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "tiny-tools"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"]}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": name, "description": f"{name} of a place", "parameters": schema},
    }
    for name, schema in SCHEMAS.items()
]
QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module", params=["qwen2", "llama3"])
def stack_client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[openai.OpenAI, httpx.Client]]:
    """A one-worker stack serving the family's tool template (the parser: auto)."""
    model = write_tools_checkpoint(tmp_path_factory.mktemp(request.param) / MODEL, request.param)
    with running_stack(model, tmp_path_factory.mktemp(f"{request.param}-logs"), workers=1) as stack:
        with http_client(stack, timeout=60) as http:
            yield client_for(stack), http


def _ask(
    client: openai.OpenAI, messages: list[Any], stream: bool, **fields: Any
) -> tuple[dict[str, Any], Any]:
    """One chat request: (content, tool_calls, finish_reason as plain data; the message
    to send back as the SDK gives it, or as rebuilt from the stream)."""
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, **fields)
        ChatCompletion.model_validate(r.model_dump(), strict=True)
        message = r.choices[0].message
        calls = [c.model_dump() for c in message.tool_calls or []]
        return {
            "content": message.content,
            "tool_calls": calls,
            "finish_reason": r.choices[0].finish_reason,
        }, message
    content: str | None = None
    calls: list[dict[str, Any]] = []
    finish = None
    for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, stream=True, **fields
    ):
        ChatCompletionChunk.model_validate(chunk.model_dump(), strict=True)
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content = (content or "") + delta.content
            for tc in delta.tool_calls or []:
                if tc.id is not None:  # a call's first delta: all but its arguments
                    assert tc.index == len(calls) and tc.type == "function"
                    assert tc.function is not None and tc.function.name and tc.function.arguments == ""
                    calls.append(
                        {
                            "id": tc.id,
                            "type": "function",
                            "function": {"name": tc.function.name, "arguments": ""},
                        }
                    )
                else:
                    assert tc.function is not None and tc.function.name is None and tc.function.arguments
                    calls[tc.index]["function"]["arguments"] += tc.function.arguments
            if choice.finish_reason is not None:
                assert not delta.tool_calls  # calls finish in a chunk of their own
                finish = choice.finish_reason
    result = {"content": content, "tool_calls": calls, "finish_reason": finish}
    return result, {"role": "assistant", "content": content, "tool_calls": calls}


def _check_calls(calls: list[dict[str, Any]], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def _results(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"temperature": 21})} for c in calls
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_call_then_the_answer(
    stack_client: tuple[openai.OpenAI, httpx.Client], stream: bool
) -> None:
    client, _ = stack_client
    first, message = _ask(client, QUESTION, stream, tool_choice="required", max_tokens=300, temperature=1.0)
    assert first["finish_reason"] == "tool_calls" and first["content"] is None
    _check_calls(first["tool_calls"], set(SCHEMAS))
    follow_up = [*QUESTION, message, *_results(first["tool_calls"])]
    final, _ = _ask(client, follow_up, stream, tool_choice="none", max_tokens=12)
    # The answer (a random model's: it may be special tokens only, which are not text).
    assert final["tool_calls"] == [] and final["finish_reason"] in ("stop", "length")
    assert isinstance(final["content"], str) or stream
    auto, _ = _ask(client, follow_up, stream, max_tokens=12)  # tool_choice defaults to "auto"
    assert auto["finish_reason"] in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_named_function_is_the_one_called(
    stack_client: tuple[openai.OpenAI, httpx.Client], stream: bool
) -> None:
    client, _ = stack_client
    named = {"type": "function", "function": {"name": "get_time"}}
    first, message = _ask(client, QUESTION, stream, tool_choice=named, max_tokens=200)
    assert first["finish_reason"] == "tool_calls" and len(first["tool_calls"]) == 1
    _check_calls(first["tool_calls"], {"get_time"})
    final, _ = _ask(
        client, [*QUESTION, message, *_results(first["tool_calls"])], stream, tool_choice="none", max_tokens=8
    )
    assert final["tool_calls"] == [] and final["finish_reason"] in ("stop", "length")


def test_tools_reach_the_template_and_bad_tools_are_400(
    stack_client: tuple[openai.OpenAI, httpx.Client],
) -> None:
    client, http = stack_client
    tokens = http.post("/tokenize", json={"model": MODEL, "messages": QUESTION, "tools": TOOLS}).json()[
        "tokens"
    ]
    prompt = http.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"]
    assert '"name": "get_weather"' in prompt and "Paris" in prompt
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[{"type": "function", "function": {"name": "bad name"}}]
        )
    assert info.value.body["param"] == "tools.0.function.name"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert info.value.body["param"] == "tool_choice.function.name"  # type: ignore[index]
