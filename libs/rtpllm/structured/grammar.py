"""Compiling structured-output constraints with llguidance.

llguidance (the Rust grammar engine of Guidance, an abi3 wheel without dependencies) is
the backend: docs/structured_outputs.md says why it, not xgrammar or outlines-core.

JSON schemas compile with two defaults that keep sampled output bounded and tidy,
without ever producing output the caller's schema rejects:
- fixed separators (`", "` and `": "`) and no other whitespace: a model sampled at a
  high temperature cannot wander into an endless run of spaces and newlines;
- objects that list `properties` without saying `additionalProperties` get it as
  `false`: the model fills the properties asked for instead of inventing keys (as
  OpenAI's strict mode and xgrammar do). Every output is still valid under the
  original schema, whose accepted set is a superset.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import llguidance

from rtpllm.structured.spec import StructuredOutputsParams

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rtpllm.tokenizer import Tokenizer

# The name clients give this backend (vLLM calls llguidance "guidance"), and "auto".
BACKEND_NAMES = ("guidance", "llguidance", "auto")

_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# `{"type": "object"}` alone: any JSON object (vLLM's json_object, OpenAI's json mode).
_ANY_OBJECT = {"type": "object"}


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint (not checked yet: see check_grammar)."""
    return _grammar_text(params.kind, _payload(params))


def _payload(params: StructuredOutputsParams) -> str:
    kind = params.kind
    if kind == "choice":
        return json.dumps(list(params.choice or ()))
    if kind == "json_object":
        return ""
    return str(getattr(params, kind))


@lru_cache(maxsize=256)
def _grammar_text(kind: str, payload: str) -> str:
    # Cached: n > 1 samples and repeated schemas (an agent's tools) compile once.
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(
            _close_objects(json.loads(payload)), defaults=_JSON_OPTIONS
        )
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=_JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(payload)
    if kind == "choice":
        # A Lark alternation of JSON-quoted literals (what llguidance's grammar_from does).
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in json.loads(payload))
        )
    if kind == "grammar":
        return llguidance.grammar_from("grammar", payload)  # Lark, or GBNF converted to Lark
    raise ValueError(f"unknown structured output kind {kind!r}")


def lark_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` for a `%json` rule of a Lark grammar, compiled as JSON schemas are here
    (closed objects; fixed separators, which llguidance reads from `x-guidance`)."""
    return {**_close_objects(schema), "x-guidance": _JSON_OPTIONS}


# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE = (
    "items",
    "additionalItems",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "additionalProperties",
    "propertyNames",
)
_LIST = ("prefixItems", "anyOf", "oneOf")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# An object schema with any of these already says what extra keys may do (or is merged).
_OPEN_KEYS = {"additionalProperties", "patternProperties", "unevaluatedProperties", "allOf"}


def _close_objects(node: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that lists
    `properties` and says nothing about extra ones (a copy; the input is not changed).

    Walks subschemas by keyword, so a property that happens to be named "properties"
    is not mistaken for one. `allOf` branches are left open: closing each would make
    branches that list different properties contradict each other."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _ONE:
        if isinstance(out.get(key), list):  # draft-4 tuple `items`
            out[key] = [_close_objects(item) for item in out[key]]
        elif key in out:
            out[key] = _close_objects(out[key])
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [_close_objects(item) for item in out[key]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: _close_objects(sub) for name, sub in out[key].items()}
    if isinstance(out.get("properties"), dict) and not _OPEN_KEYS & out.keys():
        out["additionalProperties"] = False
    return out


def check_grammar(params: StructuredOutputsParams) -> None:
    """ValueError with llguidance's message when the constraint does not compile (a bad
    schema, regex or grammar). Needs no tokenizer, so the gateway runs it cheaply."""
    try:
        grammar = grammar_text(params)
    except ValueError as exc:  # llguidance refuses malformed input while building
        raise ValueError(str(exc)) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(_first_lines(error))


def _first_lines(message: str, limit: int = 500) -> str:
    """llguidance's messages may quote the grammar; a client needs the head of it."""
    message = message.strip()
    return message if len(message) <= limit else message[:limit] + "..."


def ll_tokenizer(
    tokenizer: Tokenizer, eos_token_ids: Sequence[int], vocab_size: int | None = None
) -> llguidance.LLTokenizer:
    """llguidance's view of a `Tokenizer` (HF `tokenizers` JSON), with the engine's EOS
    ids (a grammar that is complete allows exactly those). `vocab_size`: the model's,
    when larger than the tokenizer's. Costs ~0.2 s for a 49k vocabulary: build it once."""
    vocab = max(vocab_size or 0, tokenizer.vocab_size)
    return llguidance.LLTokenizer(tokenizer.backend_json(), n_vocab=vocab, eos_token=list(eos_token_ids))
