"""Tool calling below the HTTP layer: the Hermes and Llama-3 JSON parsers (whole and
streamed in any pieces: the same calls and content), the OpenAI deltas they become,
rendering tools and tool messages through Qwen2- and Llama-3.1-style templates (the
same text and ids as HF's apply_chat_template), request validation, and the grammar
that forces calls (every sample is a valid call of an allowed function)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from msgspec import UNSET
from transformers import PreTrainedTokenizerFast

from rtpllm.api.chat import _tool_chunks
from rtpllm.api.errors import APIError
from rtpllm.api.params import chat_sampling_params
from rtpllm.api.prompts import chat_prompt
from rtpllm.api.requests import ChatCompletionRequest, ChatMessage
from rtpllm.api.responses import ChatDelta, ChatLogprobs, FunctionDelta
from rtpllm.api.tool_output import ToolOutput
from rtpllm.api.tools import tool_request
from rtpllm.protocol.messages import ChoiceDelta
from rtpllm.structured.grammar import check_grammar, ll_tokenizer
from rtpllm.structured.spec import StructuredOutputsParams
from rtpllm.tokenizer import Tokenizer
from rtpllm.tokenizer.byte_tokenizer import CHATML_TEMPLATE, write_byte_tokenizer
from rtpllm.tools import CallArguments, CallStart, Content, parser_class, resolve_parser
from rtpllm.tools.base import ParsedCall, ParsedOutput, collect
from rtpllm.tools.grammar import tool_call_grammar
from rtpllm.tools.hermes import HermesParser
from rtpllm.tools.llama3 import Llama3JsonParser
from rtpllm.tools.mistral import MistralParser
from tests.tool_templates import LLAMA31_TOOLS_TEMPLATE, QWEN2_TOOLS_TEMPLATE, write_tools_tokenizer

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city"],
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather of a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]


def _call(name: str, arguments: str) -> ParsedCall:
    return ParsedCall(name, arguments)


# -- parsers -----------------------------------------------------------------------------

HERMES_CASES = [
    ("Hello there.", ParsedOutput("Hello there.", [])),
    (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        ParsedOutput("Let me check.", [_call("get_weather", '{"city": "Paris"}')]),
    ),
    (  # several calls; whitespace between them is not content
        '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": [1, {"y": "}"}]}}\n</tool_call>\n',
        ParsedOutput("", [_call("a", "{}"), _call("b", '{"x": [1, {"y": "}"}]}')]),
    ),
    (  # arguments first: read whole with json once the call closes
        '<tool_call>{"arguments": {"q": 1}, "name": "g"}</tool_call> done',
        ParsedOutput("done", [_call("g", '{"q": 1}')]),
    ),
    (  # SmolLM2's training format: a list of calls in one block
        '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</tool_call>',
        ParsedOutput("", [_call("a", '{"x": 1}'), _call("b", "{}")]),
    ),
    ("<tool_call>not a call</tool_call> after", ParsedOutput("<tool_call>not a call</tool_call> after", [])),
    ("a < b and <tool_c", ParsedOutput("a < b and <tool_c", [])),  # a held prefix that never became a marker
    (  # cut by max_tokens inside the arguments: the call stands, its arguments as far as written
        '<tool_call>\n{"name": "f", "arguments": {"x": "ab',
        ParsedOutput("", [_call("f", '{"x": "ab')]),
    ),
    ('<tool_call>\n{"name": "f", "argum', ParsedOutput('<tool_call>\n{"name": "f", "argum', [])),
    (
        'Escapes: <tool_call>{"name": "f", "arguments": {"s": "a\\"}\\\\"}}</tool_call>',
        ParsedOutput("Escapes:", [_call("f", '{"s": "a\\"}\\\\"}')]),
    ),
]

LLAMA3_CASES = [
    (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        ParsedOutput("", [_call("get_weather", '{"city": "Paris"}')]),
    ),
    (
        '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"x": [1]}}',
        ParsedOutput("", [_call("a", "{}"), _call("b", '{"x": [1]}')]),
    ),
    ("The answer is 4.", ParsedOutput("The answer is 4.", [])),
    ('  {"answer": 42}', ParsedOutput('  {"answer": 42}', [])),  # JSON that is not a call is content
    ('{"parameters": {"a": 1}, "name": "z"}', ParsedOutput("", [_call("z", '{"a": 1}')])),
    ('{"name": "f", "parameters": {"a": 1}} and more', ParsedOutput("and more", [_call("f", '{"a": 1}')])),
    ("", ParsedOutput("", [])),
]

MISTRAL_CASES = [
    (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        ParsedOutput("", [_call("get_weather", '{"city": "Paris"}')]),
    ),
    (  # the marker gone with skip_special_tokens; several calls
        '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": [1, {"y": "]"}]}}]',
        ParsedOutput("", [_call("a", "{}"), _call("b", '{"x": [1, {"y": "]"}]}')]),
    ),
    (  # text before the marker is content
        'Let me check. [TOOL_CALLS][{"name": "f", "arguments": {"q": 1}}]',
        ParsedOutput("Let me check.", [_call("f", '{"q": 1}')]),
    ),
    (  # v11 tokenizers: name[ARGS]{arguments}, one after another
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}',
        ParsedOutput("", [_call("get_weather", '{"city": "Paris"}'), _call("get_time", '{"zone": "UTC"}')]),
    ),
    (  # one call object without the list
        '[TOOL_CALLS]{"name": "f", "arguments": {}}',
        ParsedOutput("", [_call("f", "{}")]),
    ),
    (  # arguments first: read whole with json at the end
        '[TOOL_CALLS][{"arguments": {"q": 1}, "name": "g"}]',
        ParsedOutput("", [_call("g", '{"q": 1}')]),
    ),
    ("[1, 2, 3]", ParsedOutput("[1, 2, 3]", [])),  # an answer that is a JSON list stays content
    ("The answer is [4].", ParsedOutput("The answer is [4].", [])),
    ("[TOOL_CALLS] not a call", ParsedOutput("[TOOL_CALLS] not a call", [])),
    ("a [TOOL_CA", ParsedOutput("a [TOOL_CA", [])),  # a held prefix that never became the marker
    (  # cut by max_tokens inside the arguments
        '[TOOL_CALLS][{"name": "f", "arguments": {"x": "ab',
        ParsedOutput("", [_call("f", '{"x": "ab')]),
    ),
    ("", ParsedOutput("", [])),
]

CASES = (
    [("hermes", *c) for c in HERMES_CASES]
    + [("llama3_json", *c) for c in LLAMA3_CASES]
    + [("mistral", *c) for c in MISTRAL_CASES]
)


def _streamed(name: str, pieces: list[str]) -> ParsedOutput:
    parser = parser_class(name)()
    events = [e for piece in pieces for e in parser.feed(piece)]
    return collect(events + parser.finish())


@pytest.mark.parametrize(("name", "text", "expected"), CASES)
def test_parsers_whole_and_character_by_character(name: str, text: str, expected: ParsedOutput) -> None:
    assert parser_class(name)().parse(text) == expected
    assert _streamed(name, list(text)) == expected


@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_any_split_of_the_stream_gives_the_same_output(
    case: tuple[str, str, ParsedOutput], cuts: list[int]
) -> None:
    name, text, expected = case
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert _streamed(name, pieces) == expected


def test_a_call_is_announced_once_its_name_is_known_and_text_is_held_only_while_it_may_be_a_marker() -> None:
    p = HermesParser()
    assert p.feed("Sure") == [Content("Sure")]
    assert p.feed(" <tool") == []  # " <tool" may begin "<tool_call>"
    assert p.feed('_call>\n{"name": "get_weather", ') == []
    assert p.feed('"arguments": {"city"') == [CallStart(0, "get_weather"), CallArguments(0, '{"city"')]
    assert p.feed(': "Paris"}}\n</tool_call>') == [CallArguments(0, ': "Paris"}')]
    assert p.finish() == []
    q = HermesParser()
    assert q.feed("a <b") == [Content("a <b")]  # cannot begin the marker: not held
    q = Llama3JsonParser()
    assert q.feed('  {"name"') == []
    assert q.feed(': "f", "parameters": {') == [CallStart(0, "f"), CallArguments(0, "{")]


# -- OpenAI deltas -------------------------------------------------------------------------


def _reassemble(deltas: list[Any]) -> tuple[str, list[dict[str, str]]]:
    """What the openai SDK's stream helpers rebuild from deltas."""
    content, calls = "", []
    for d in deltas:
        if d.content is not UNSET:
            content += d.content
        for tc in [] if d.tool_calls is UNSET else d.tool_calls:
            if tc.id is not UNSET:
                assert tc.index == len(calls) and tc.type == "function" and tc.function.arguments == ""
                calls.append({"id": tc.id, "name": tc.function.name, "arguments": ""})
            else:
                assert tc.function.name is UNSET
                calls[tc.index]["arguments"] += tc.function.arguments
    return content, calls


@pytest.mark.parametrize(("name", "text", "expected"), CASES)
def test_streamed_deltas_add_up_to_the_message(name: str, text: str, expected: ParsedOutput) -> None:
    whole = ToolOutput(parser_class(name)())
    whole.feed(text)
    whole.finish()
    content, calls = whole.message()
    streamed = ToolOutput(parser_class(name)())
    deltas = [d for ch in text for d in streamed.feed(ch)] + streamed.finish()
    s_content, s_calls = _reassemble(deltas)
    assert [(c.function.name, c.function.arguments) for c in calls or []] == [
        (c["name"], c["arguments"]) for c in s_calls
    ]
    assert (content or "") == s_content == expected.content
    assert (content is None) == bool(calls and not expected.content.strip())
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls or [])
    assert whole.finish_reason("stop") == ("tool_calls" if expected.calls else "stop")
    assert whole.finish_reason("length") == "length"


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    out = ToolOutput(HermesParser(), max_calls=1)
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    deltas = out.feed(text) + out.finish()
    assert [c["name"] for c in _reassemble(deltas)[1]] == ["a"]
    assert [c.function.name for c in out.message()[1] or []] == ["a"]


# -- choosing the parser -------------------------------------------------------------------


def test_auto_reads_the_format_off_the_template() -> None:
    assert resolve_parser("auto", QWEN2_TOOLS_TEMPLATE) is HermesParser
    assert resolve_parser("auto", LLAMA31_TOOLS_TEMPLATE) is Llama3JsonParser
    assert resolve_parser("auto", CHATML_TEMPLATE) is HermesParser  # no tools shown: Hermes
    assert resolve_parser("auto", None) is HermesParser
    assert resolve_parser("llama3_json", QWEN2_TOOLS_TEMPLATE) is Llama3JsonParser
    assert resolve_parser("auto", "{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}") is MistralParser
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        resolve_parser("mistral_v2", None)


# -- rendering -----------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    {"role": "assistant", "content": "22 C and sunny."},
    {"role": "user", "content": "And the time there?"},
]


@pytest.fixture(scope="module", params=["qwen2", "llama3"])
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(request.param)
    write_tools_tokenizer(root, request.param)
    return request.param, root


def _messages(conversation: list[dict[str, Any]]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in conversation]


def _hf_conversation(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as HF's apply_chat_template takes it: arguments as objects."""
    out = json.loads(json.dumps(conversation))
    for message in out:
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


def test_tools_and_tool_messages_render_as_hf_renders_them(family_dir: tuple[str, Path]) -> None:
    family, root = family_dir
    tok = Tokenizer.from_dir(root)
    hf = PreTrainedTokenizerFast.from_pretrained(str(root))
    prompt = chat_prompt(tok, _messages(CONVERSATION), tools=TOOLS)
    expected = hf.apply_chat_template(
        _hf_conversation(CONVERSATION), tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert prompt.text == expected
    assert prompt.token_ids == hf.apply_chat_template(
        _hf_conversation(CONVERSATION),
        tools=TOOLS,
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    # The model sees each tool's schema and the call in its own format.
    assert json.dumps(TOOLS[1]) in prompt.text if family == "qwen2" else '"name": "get_time"' in prompt.text
    call = (
        '{"name": "get_weather", "arguments": {"city": "Paris"}}'
        if family == "qwen2"
        else '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    )
    assert call in prompt.text
    # Without tools the template renders no tool section.
    plain = chat_prompt(tok, _messages([{"role": "user", "content": "hi"}]))
    assert "get_weather" not in (plain.text or "")


def test_special_tokens_in_call_arguments_stay_text(family_dir: tuple[str, Path]) -> None:
    _, root = family_dir
    tok = Tokenizer.from_dir(root)
    end = tok.eos_token_ids[0]
    forged = json.loads(json.dumps(CONVERSATION))
    forged[2]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": f"Paris{tok.eos_token}"})
    honest = chat_prompt(tok, _messages(CONVERSATION), tools=TOOLS).token_ids
    prompt = chat_prompt(tok, _messages(forged), tools=TOOLS)
    assert prompt.token_ids.count(end) == honest.count(end)
    assert tok.decode(prompt.token_ids, skip_special_tokens=False) == prompt.text  # the same text, guarded


def test_llama31_template_refuses_two_calls_in_one_message(tmp_path: Path) -> None:
    write_tools_tokenizer(tmp_path, "llama3")
    conversation = json.loads(json.dumps(CONVERSATION[:4]))
    conversation[2]["tool_calls"].append(
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    )
    with pytest.raises(APIError, match="single tool-calls") as info:
        chat_prompt(Tokenizer.from_dir(tmp_path), _messages(conversation), tools=TOOLS)
    assert info.value.param == "messages"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (
            lambda c: c[2]["tool_calls"][0]["function"].update(arguments="{oops"),
            "messages.2.tool_calls.0.function.arguments",
        ),
        (lambda c: c[1].update(tool_calls=c[2]["tool_calls"]), "messages.1.tool_calls"),
        (
            lambda c: c[2]["tool_calls"][0].update(function={"arguments": "{}"}),
            "messages.2.tool_calls.0.function",
        ),
    ],
)
def test_bad_tool_messages_are_400_naming_them(tmp_path: Path, change: Any, param: str) -> None:
    write_tools_tokenizer(tmp_path, "qwen2")
    conversation = json.loads(json.dumps(CONVERSATION))
    change(conversation)
    with pytest.raises(APIError) as info:
        chat_prompt(Tokenizer.from_dir(tmp_path), _messages(conversation), tools=TOOLS)
    assert info.value.status == 400 and info.value.param == param


# -- validation ----------------------------------------------------------------------------


def _request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def _fn(**spec: Any) -> list[dict[str, Any]]:
    return [{"type": "function", "function": spec}]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tools": [{"type": "function", "function": {"name": "f"}, "extra": 1}]}, "tools.0.extra"),
        ({"tools": _fn(name="bad name")}, "tools.0.function.name"),
        ({"tools": _fn(name="f", colour="red")}, "tools.0.function.colour"),
        ({"tools": _fn(name="f") + _fn(name="f")}, "tools.1.function.name"),
        ({"tools": _fn(name="f", description=3)}, "tools.0.function.description"),
        ({"tools": _fn(name="f", parameters={"type": "string"})}, "tools.0.function.parameters"),
        (
            {"tools": _fn(name="f", parameters={"type": "object", "properties": {"x": {"type": "nope"}}})},
            "tools.0.function.parameters",
        ),
        ({"tools": _fn(name="f", parameters="{}")}, "tools.0.function.parameters"),
        ({"tools": _fn(name="f"), "tool_choice": "always"}, "tool_choice"),
        (
            {"tools": _fn(name="f"), "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice.function.name",
        ),
        (
            {"tools": _fn(name="f"), "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}},
            "tool_choice.type",
        ),
        ({"tools": _fn(name="f"), "tool_choice": {"type": "function"}}, "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice.function.name"),
    ],
)
def test_invalid_tools_are_400_naming_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as info:
        chat_sampling_params(_request(**fields))
    assert info.value.status == 400 and info.value.param == param, info.value.body()


def test_what_each_tool_choice_asks() -> None:
    assert tool_request(_request()) is None
    assert tool_request(_request(tool_choice="auto")) is None  # nothing to call
    auto = tool_request(_request(tools=TOOLS))
    assert auto is not None and auto.choice == "auto" and auto.parses and auto.max_calls is None
    assert auto.constraint(HermesParser.call_format) is None
    assert auto.template_tools == TOOLS
    none = tool_request(_request(tools=TOOLS, tool_choice="none"))
    assert none is not None and not none.parses  # rendered with the tools, never parsed
    single = tool_request(_request(tools=TOOLS, parallel_tool_calls=False))
    assert single is not None and single.max_calls == 1
    named = tool_request(
        _request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    )
    assert named is not None and named.max_calls == 1
    one = named.constraint(HermesParser.call_format)
    assert one is not None and (one.grammar or "").startswith("start: call\n")  # exactly one call
    required = tool_request(_request(tools=TOOLS, tool_choice="required"))
    several = required.constraint(HermesParser.call_format) if required is not None else None
    assert several is not None and "call)*" in (several.grammar or "")  # one or more
    grammar = named.constraint(Llama3JsonParser.call_format)
    assert (
        grammar is not None
        and "get_time" in (grammar.grammar or "")
        and "get_weather" not in (grammar.grammar or "")
    )
    params = chat_sampling_params(
        _request(tools=TOOLS, tool_choice="required"), call_format=Llama3JsonParser.call_format
    )
    assert params.structured_outputs is not None and '"parameters"' in (
        params.structured_outputs.grammar or ""
    )


# -- the grammar that forces calls ---------------------------------------------------------


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root: Path = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(root, 320)
    return Tokenizer.from_dir(root)


def _walk(
    ll: llguidance.LLTokenizer, tok: Tokenizer, grammar: str, rng: random.Random, limit: int = 800
) -> str:
    """One output sampled uniformly among the tokens the grammar allows, to its end."""
    matcher = llguidance.LLMatcher(ll, llguidance.grammar_from("grammar", grammar), log_level=0)
    out: list[int] = []
    while not matcher.is_stopped():
        allowed = np.flatnonzero(
            np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
        )
        token = int(rng.choice(allowed[allowed < tok.vocab_size]))
        if token in tok.eos_token_ids:
            break
        assert matcher.consume_token(token), matcher.get_error()
        out.append(token)
        assert len(out) < limit, tok.decode(out)
    return tok.decode(out)


SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.mark.parametrize("parser", [HermesParser, Llama3JsonParser, MistralParser])
@pytest.mark.parametrize(
    ("choice", "several"), [("required", True), ("required", False), ("get_time", False)]
)
def test_every_sample_of_the_grammar_is_a_valid_call(
    byte_tokenizer: Tokenizer, parser: type, choice: str, several: bool
) -> None:
    functions = list(SCHEMAS.items()) if choice == "required" else [(choice, SCHEMAS[choice])]
    grammar = tool_call_grammar(parser.call_format, functions, several)
    check_grammar(StructuredOutputsParams(grammar=grammar))
    ll = ll_tokenizer(byte_tokenizer, byte_tokenizer.eos_token_ids)
    rng = random.Random(0)
    counts = set()
    for _ in range(15):
        text = _walk(ll, byte_tokenizer, grammar, rng)
        parsed = parser().parse(text)
        assert parsed.content == "" and parsed.calls, text
        counts.add(len(parsed.calls))
        for call in parsed.calls:
            assert call.name in dict(functions)
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert counts == {1} or (several and parser.call_format.parallel)


@pytest.mark.parametrize("several", [True, False])
def test_several_calls_only_where_allowed(byte_tokenizer: Tokenizer, several: bool) -> None:
    grammar = tool_call_grammar(HermesParser.call_format, list(SCHEMAS.items()), several)
    ll = ll_tokenizer(byte_tokenizer, byte_tokenizer.eos_token_ids)
    matcher = llguidance.LLMatcher(ll, llguidance.grammar_from("grammar", grammar), log_level=0)
    one = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    ids = byte_tokenizer.encode(one + "\n" + one, add_special_tokens=False)
    accepted = all(matcher.consume_token(t) for t in ids)
    assert accepted == several


def test_stream_chunks_of_an_engine_delta() -> None:
    output = ToolOutput(HermesParser())
    logprobs = ChatLogprobs(content=[])
    held = _tool_chunks(output, ChoiceDelta(index=1, text="<tool_"), logprobs)
    assert [(c.index, c.delta, c.logprobs) for c in held] == [
        (1, ChatDelta(), logprobs)
    ]  # held text, its logprobs
    text = 'call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    chunks = _tool_chunks(output, ChoiceDelta(index=1, text=text, finish_reason="stop"), None)
    assert [c.finish_reason for c in chunks] == [None, None, "tool_calls"]
    start, arguments, end = (c.delta for c in chunks)
    assert start.tool_calls[0].function == FunctionDelta(name="f", arguments="")  # type: ignore[index]
    assert arguments.tool_calls[0].function == FunctionDelta(arguments='{"a": 1}')  # type: ignore[index]
    assert end == ChatDelta()


def test_mistral_tools_keep_special_tokens_unless_the_request_says() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    fmt = MistralParser.call_format
    assert chat_sampling_params(ChatCompletionRequest.model_validate(base), call_format=fmt).skip_special_tokens is False
    explicit = ChatCompletionRequest.model_validate({**base, "skip_special_tokens": True})
    assert chat_sampling_params(explicit, call_format=fmt).skip_special_tokens is True
    none = ChatCompletionRequest.model_validate({**base, "tool_choice": "none"})
    assert chat_sampling_params(none, call_format=fmt).skip_special_tokens is True
    hermes = ChatCompletionRequest.model_validate(base)
    assert chat_sampling_params(hermes, call_format=HermesParser.call_format).skip_special_tokens is True


def test_offline_chat_renders_tools_and_template_options_as_the_server_does(tmp_path: Path) -> None:
    from rtpllm import LLM, SamplingParams
    from tests.tool_templates import write_tools_checkpoint

    model = write_tools_checkpoint(tmp_path / "qwen2", "qwen2")
    llm = LLM(str(model), device="cpu", max_model_len=2048)
    tok = llm.get_tokenizer()
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": CONVERSATION[:2], "tools": TOOLS})
    server_ids = chat_prompt(tok, req.messages, max_model_len=2048, max_tokens=8, tools=tool_request(req).template_tools).token_ids
    out = llm.chat(CONVERSATION[:2], SamplingParams(max_tokens=2), tools=TOOLS)[0]
    assert out.prompt_token_ids == server_ids
    assert "get_weather" in tok.decode(out.prompt_token_ids)
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        llm.chat(CONVERSATION[:2], continue_final_message=True)
    partial = [*CONVERSATION[:2], {"role": "assistant", "content": "It is"}]
    cont = llm.chat(partial, SamplingParams(max_tokens=2), add_generation_prompt=False, continue_final_message=True)[0]
    assert tok.decode(cont.prompt_token_ids).endswith("It is")
