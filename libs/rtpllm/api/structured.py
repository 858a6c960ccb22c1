"""A request's structured-output fields -> `StructuredOutputsParams`, or a 400 naming
the field.

The forms accepted (chat and completions alike, as vLLM does):
- OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type":
  "json_object"}`, `{"type": "json_schema", "json_schema": {"name", "schema",
  "strict", "description"}}`;
- vLLM's `guided_json` (a schema, or its JSON text), `guided_regex`, `guided_choice`,
  `guided_grammar` (Lark, or GBNF/EBNF), with `guided_decoding_backend` naming
  llguidance ("guidance", "llguidance") or "auto";
- vLLM's newer `structured_outputs` object: one of `json`, `regex`, `choice`,
  `grammar`, `json_object`.

At most one constraint per request. Each is compiled here with llguidance (no tokenizer
needed, well under a millisecond for common schemas), so a bad schema, regex or grammar
is a 400 naming its field before anything is routed; the engine compiles it again for
its matcher and refuses it the same way.
"""

from __future__ import annotations

import json
from typing import Any

from rtpllm.api.errors import bad_request
from rtpllm.api.requests import _SamplingFields
from rtpllm.structured.grammar import BACKEND_NAMES, check_grammar
from rtpllm.structured.spec import StructuredOutputsParams

# vLLM's structured_outputs options that only permit what this backend already does
# (or never does: falling back to another backend), so any value is honoured.
_HONOURED_OPTIONS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties")
_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}


def structured_outputs(req: _SamplingFields) -> StructuredOutputsParams | None:
    """The request's one constraint (None without any), compiled once to check it."""
    backend = req.guided_decoding_backend
    if backend is not None and backend.lower() not in BACKEND_NAMES:
        raise bad_request(
            f"guided_decoding_backend {backend!r} is not available: this server's structured outputs use "
            "llguidance (send 'guidance', 'llguidance' or 'auto', or leave it out).",
            "guided_decoding_backend",
        )
    if req.guided_whitespace_pattern is not None:
        raise bad_request("guided_whitespace_pattern is not supported.", "guided_whitespace_pattern")
    found: list[tuple[str, dict[str, Any]]] = []  # (param, StructuredOutputsParams fields)
    fmt = _response_format(req.response_format)
    if fmt is not None:
        found.append(fmt)
    if req.guided_json is not None:
        found.append(("guided_json", {"json": _schema(req.guided_json, "guided_json")}))
    if req.guided_regex is not None:
        found.append(("guided_regex", {"regex": req.guided_regex}))
    if req.guided_choice:
        found.append(("guided_choice", {"choice": req.guided_choice}))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", {"grammar": req.guided_grammar}))
    if req.structured_outputs is not None:
        found.extend(_structured_object(req.structured_outputs))
    if not found:
        return None
    if len(found) > 1:
        raise bad_request(
            f"Send one structured-output constraint, not several: got {', '.join(p for p, _ in found)}.",
            found[1][0],
        )
    param, fields = found[0]
    try:
        params = StructuredOutputsParams(**fields)
        check_grammar(params)
    except ValueError as exc:
        raise bad_request(f"Invalid {param}: {exc}", param) from None
    return params


def _response_format(fmt: dict[str, Any] | None) -> tuple[str, dict[str, Any]] | None:
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", {"json_object": True}
    if kind != "json_schema":
        raise bad_request(
            f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'.",
            "response_format.type",
        )
    spec = fmt.get("json_schema")
    param = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise bad_request(f"{param} must be an object with a name and a schema.", param)
    unknown = sorted(set(spec) - _JSON_SCHEMA_KEYS)
    if unknown:
        raise bad_request(
            f"Unrecognized request argument supplied: {param}.{unknown[0]}", f"{param}.{unknown[0]}"
        )
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise bad_request(f"Missing required parameter: '{param}.name'.", f"{param}.name")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise bad_request(f"{param}.strict must be a boolean.", f"{param}.strict")
    if "schema" not in spec:
        raise bad_request(f"Missing required parameter: '{param}.schema'.", f"{param}.schema")
    # strict or not, the output follows the schema exactly (strict is what it asks for).
    return f"{param}.schema", {"json": _schema(spec["schema"], f"{param}.schema")}


def _structured_object(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for key, value in obj.items():
        param = f"structured_outputs.{key}"
        if value is None or (key == "json_object" and value is False) or key in _HONOURED_OPTIONS:
            continue
        if key not in _KINDS:
            raise bad_request(f"{param} is not supported.", param)
        if key == "json":
            value = _schema(value, param)
        elif key == "choice":
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise bad_request(f"{param} must be a list of strings.", param)
        elif key == "json_object":
            if value is not True:
                raise bad_request(f"{param} must be a boolean.", param)
        elif not isinstance(value, str):
            raise bad_request(f"{param} must be a string.", param)
        out.append((param, {key: value}))
    return out


def _schema(value: Any, param: str) -> dict[str, Any]:
    """A JSON schema sent as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise bad_request(f"{param} is not valid JSON: {exc}.", param) from None
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be a JSON schema object.", param)
    return value
