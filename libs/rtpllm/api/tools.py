"""A chat request's tool fields -> what rendering, sampling and the response need, or a
400 naming the field (docs/tool_calling.md).

- `tools`: OpenAI's function tools, `{"type": "function", "function": {"name",
  "description", "parameters", "strict"}}`; names are unique, `[A-Za-z0-9_-]{1,64}`,
  and each parameter schema describes an object and compiles (llguidance, as
  `guided_json` does), so a bad one is a 400 naming it before anything runs.
- `tool_choice`: "none" (no call is read from the output), "auto" (the default with
  tools: the output is read for calls), "required" (one or more calls, forced by a
  grammar), or `{"type": "function", "function": {"name"}}` (exactly that call).
- `parallel_tool_calls` (default true): false allows one call (later ones are dropped
  under "auto"; the grammar writes one under "required").
- The calls in assistant messages, for the chat template: arguments parsed from their
  JSON text into objects, as HF templates expect them (Qwen2.5's and Llama-3.1's write
  `arguments | tojson`), the way vLLM hands them over.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from rtpllm.api.errors import bad_request
from rtpllm.api.requests import ChatCompletionRequest
from rtpllm.structured.grammar import check_grammar
from rtpllm.structured.spec import StructuredOutputsParams
from rtpllm.tools.base import CallFormat
from rtpllm.tools.grammar import tool_call_grammar

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOOL_KEYS = {"type", "function"}
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
_CHOICE_KEYS = {"type", "function"}
# A function without parameters takes none: its arguments are `{}`.
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Function:
    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolRequest:
    """A request's validated tools and what it asks of them."""

    functions: tuple[Function, ...]
    template_tools: list[dict[str, Any]]  # the tools as the chat template gets them
    choice: str  # "none", "auto", "required" or "function" (named)
    named: str | None
    parallel: bool

    @property
    def parses(self) -> bool:
        """Whether calls are read from the output (not under "none")."""
        return self.choice != "none"

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel and self.choice != "function" else 1

    def constraint(self, call_format: CallFormat) -> StructuredOutputsParams | None:
        """The grammar that forces the calls ("required", named), else None."""
        if self.choice == "required":
            functions, several = self.functions, self.parallel
        elif self.choice == "function":
            functions, several = tuple(f for f in self.functions if f.name == self.named), False
        else:
            return None
        grammar = tool_call_grammar(call_format, [(f.name, f.parameters) for f in functions], several)
        return StructuredOutputsParams(grammar=grammar)


def tool_request(req: ChatCompletionRequest) -> ToolRequest | None:
    """The request's tools (None without any, and with no tool_choice needing them)."""
    functions, template = check_tools(req.tools)
    choice, named = _tool_choice(req.tool_choice, functions)
    if not functions:
        return None
    parallel = req.parallel_tool_calls is not False
    return ToolRequest(functions, template, choice, named, parallel)


def check_tools(
    tools: list[dict[str, Any]] | None, param: str = "tools"
) -> tuple[tuple[Function, ...], list[dict[str, Any]]]:
    """The functions of `tools`, and the tools as the chat template gets them (as sent)."""
    if not tools:
        return (), []
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"At most {MAX_TOOLS} tools are accepted, got {len(tools)}.", param)
    functions: list[Function] = []
    for i, tool in enumerate(tools):
        at = f"{param}.{i}"
        _known_keys(tool, _TOOL_KEYS, at)
        if tool.get("type") != "function":
            raise bad_request(
                f"{at}.type must be 'function' (the only kind of tool supported).", f"{at}.type"
            )
        spec = tool.get("function")
        if not isinstance(spec, dict):
            raise bad_request(f"Missing required parameter: '{at}.function'.", f"{at}.function")
        _known_keys(spec, _FUNCTION_KEYS, f"{at}.function")
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request(
                f"{at}.function.name must be 1 to 64 letters, digits, underscores or dashes, got {name!r}.",
                f"{at}.function.name",
            )
        if any(f.name == name for f in functions):
            raise bad_request(f"Tool names must be unique: {name!r} is given twice.", f"{at}.function.name")
        if spec.get("description") is not None and not isinstance(spec["description"], str):
            raise bad_request(f"{at}.function.description must be a string.", f"{at}.function.description")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise bad_request(f"{at}.function.strict must be a boolean.", f"{at}.function.strict")
        functions.append(Function(name, _parameters(spec.get("parameters"), f"{at}.function.parameters")))
    return tuple(functions), list(tools)


def template_tool_calls(calls: list[dict[str, Any]], param: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` as chat templates take them: arguments as
    the object their JSON text holds (an object sent as is is kept)."""
    out = []
    for j, call in enumerate(calls):
        at = f"{param}.{j}"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise bad_request(f"{at} must be a function call: {{'id', 'type': 'function', 'function'}}.", at)
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{at}.function must have a name and arguments.", f"{at}.function")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError as exc:
                raise bad_request(
                    f"{at}.function.arguments is not valid JSON: {exc}.", f"{at}.function.arguments"
                ) from None
        item: dict[str, Any] = {
            "type": "function",
            "function": {"name": function["name"], "arguments": arguments},
        }
        if isinstance(call.get("id"), str):
            item["id"] = call["id"]
        out.append(item)
    return out


def _tool_choice(choice: Any, functions: tuple[Function, ...]) -> tuple[str, str | None]:
    if choice is None:
        return ("auto" if functions else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(
                f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}.",
                "tool_choice",
            )
        if choice == "required" and not functions:
            raise bad_request("tool_choice 'required' needs tools.", "tool_choice")
        return choice, None
    if not isinstance(choice, dict):
        raise bad_request(
            "tool_choice must be a string or {'type': 'function', 'function': {'name'}}.", "tool_choice"
        )
    if choice.get("type") != "function":
        raise bad_request(
            f"tool_choice type {choice.get('type')!r} is not supported; use 'function'.", "tool_choice.type"
        )
    _known_keys(choice, _CHOICE_KEYS, "tool_choice")
    spec = choice.get("function")
    name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str):
        raise bad_request(
            "Missing required parameter: 'tool_choice.function.name'.", "tool_choice.function.name"
        )
    if isinstance(spec, dict):
        _known_keys(spec, {"name"}, "tool_choice.function")
    if not any(f.name == name for f in functions):
        raise bad_request(
            f"tool_choice names {name!r}, which is not among the tools.", "tool_choice.function.name"
        )
    return "function", name


def _parameters(value: Any, param: str) -> dict[str, Any]:
    if value is None:
        return _NO_PARAMETERS
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be a JSON schema object.", param)
    kind = value.get("type", "object")
    if kind != "object":
        raise bad_request(f"{param} must describe an object (type 'object'), got type {kind!r}.", param)
    error = _schema_error(json.dumps(value, sort_keys=True))
    if error:
        raise bad_request(f"Invalid {param}: {error}", param)
    return value


@lru_cache(maxsize=1024)
def _schema_error(schema: str) -> str | None:
    """llguidance's complaint about a parameter schema (cached: an agent sends the same
    tools with every turn)."""
    try:
        check_grammar(StructuredOutputsParams(json=schema))
    except ValueError as exc:
        return str(exc)
    return None


def _known_keys(obj: Any, known: set[str], param: str) -> None:
    if not isinstance(obj, dict):
        raise bad_request(f"{param} must be an object.", param)
    unknown = sorted(set(obj) - known)
    if unknown:
        raise bad_request(
            f"Unrecognized request argument supplied: {param}.{unknown[0]}", f"{param}.{unknown[0]}"
        )
