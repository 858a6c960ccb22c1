"""Tool calling with real text: SmolLM2-135M-Instruct through the gateway's own steps
(request -> grammar and prompt -> generation -> parsed message), greedy.

SmolLM2's chat template renders no tools (the gateway warns of that), so the system
message describes the tool, in the Hermes format SmolLM2 was trained on; the named
function's grammar makes the call well-formed, and the model fills in the city. The
tool result then goes back through the template and the model answers from it.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from rtpllm import LLM
from rtpllm.api.params import chat_sampling_params
from rtpllm.api.prompts import chat_prompt
from rtpllm.api.requests import ChatCompletionRequest
from rtpllm.api.tool_output import ToolParsing
from rtpllm.api.tools import tool_request
from rtpllm.tools import resolve_parser

pytestmark = pytest.mark.slow

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"],
            },
        },
    }
]
SYSTEM = (
    "You are a helpful assistant with one tool, get_weather(city), which tells the weather in a city. To call it, "
    'write <tool_call>{"name": "get_weather", "arguments": {"city": ...}}</tool_call>.'
)


@pytest.fixture(scope="module")
def smollm2() -> LLM:
    return LLM("smollm2-135m-instruct", device="cpu", max_model_len=1024)


def _turn(llm: LLM, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """One chat turn as the gateway runs it: the assistant message and finish reason."""
    tok = llm.get_tokenizer()
    assert tok is not None
    parser = resolve_parser("auto", tok.chat_template)
    req = ChatCompletionRequest.model_validate({"tools": TOOLS, "temperature": 0, "max_tokens": 60, **body})
    tools = tool_request(req)
    assert tools is not None
    params = chat_sampling_params(req, tools, parser.call_format)
    prompt = chat_prompt(tok, req.messages, tools=tools.template_tools)
    out = llm.generate([prompt.token_ids], params)[0].outputs[0]
    output = ToolParsing(parser, tools.max_calls).output()
    output.feed(out.text)
    output.finish()
    content, calls = output.message()
    message = {
        "role": "assistant",
        "content": content,
        "tool_calls": [msgspec.to_builtins(c) for c in calls or []],
    }
    return message, output.finish_reason(out.finish_reason or "")


def test_smollm2_calls_the_tool_and_answers_from_its_result(smollm2: LLM) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What's the weather like in Paris today?"},
    ]
    named = {"type": "function", "function": {"name": "get_weather"}}
    call, reason = _turn(smollm2, {"messages": messages, "tool_choice": named})
    assert reason == "tool_calls" and call["content"] is None
    [tool_call] = call["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert "Paris" in json.loads(tool_call["function"]["arguments"])["city"]
    result = {
        "role": "tool",
        "tool_call_id": tool_call["id"],
        "content": '{"temperature_c": 22, "sky": "sunny"}',
    }
    answer, reason = _turn(smollm2, {"messages": [*messages, call, result], "tool_choice": "none"})
    assert reason == "stop" and not answer["tool_calls"]
    text = answer["content"] or ""
    assert "Paris" in text and ("sunny" in text or "22" in text), text
