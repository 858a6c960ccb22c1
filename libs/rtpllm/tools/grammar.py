"""The grammar that forces tool calls (`tool_choice: "required"` or a named function):
an output of nothing but calls in the model's format, each naming one of the allowed
functions with arguments valid under that function's parameter schema.

A Lark grammar for llguidance, one `%json` rule per function (`{"name": <const>,
"<arguments key>": <parameters>}`), so names and arguments are checked by the same
JSON-schema engine as `guided_json`, with its defaults (rtpllm.structured.grammar:
fixed separators, objects closed unless they say otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rtpllm.structured.grammar import lark_json_schema
from rtpllm.tools.base import CallFormat


def tool_call_grammar(
    call_format: CallFormat, functions: Sequence[tuple[str, dict[str, Any]]], several: bool
) -> str:
    """Lark text: one call, or with `several` (and a format that has several per
    message) one or more, each of one of `functions` (name, parameters schema; the
    arguments are an object whatever the schema says, as the parsers read them)."""
    if not functions:
        raise ValueError("a tool-call grammar needs at least one function")
    key = call_format.arguments_key
    repeat = several and call_format.parallel
    calls = "call" + (f" ({_literal(call_format.separator)} call)*" if repeat else "")
    lines = [
        "start: " + " ".join(p for p in (_literal(call_format.opening), calls, _literal(call_format.closing)) if p),
        "call: "
        + " ".join(p for p in (_literal(call_format.prefix), "body", _literal(call_format.suffix)) if p),
        "body: " + " | ".join(f"fn_{i}" for i in range(len(functions))),
    ]
    for i, (name, parameters) in enumerate(functions):
        schema = {
            "type": "object",
            "properties": {"name": {"const": name}, key: {**parameters, "type": "object"}},
            "required": ["name", key],
        }
        lines.append(f"fn_{i}: %json " + json.dumps(lark_json_schema(schema), ensure_ascii=False))
    return "\n".join(lines) + "\n"


def _literal(text: str) -> str:
    return json.dumps(text) if text else ""
