"""Which tool-call parser a model gets: named by `--tool-call-parser`, or `auto`, read
off its chat template (the template shows the model the format it was trained on)."""

from __future__ import annotations

from rtpllm.tools.base import ToolCallParser
from rtpllm.tools.hermes import HermesParser
from rtpllm.tools.llama3 import Llama3JsonParser
from rtpllm.tools.mistral import TOOL_CALLS, MistralParser

_PARSERS: dict[str, type[ToolCallParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}
PARSER_NAMES = ("auto", *_PARSERS)

# Text only a Llama-3 template has: its tool-call tag, or its turn headers.
_LLAMA3_MARKERS = ("<|python_tag|>", "<|start_header_id|>")


def parser_class(name: str) -> type[ToolCallParser]:
    """The parser of a format name (ValueError for an unknown one)."""
    try:
        return _PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; one of {', '.join(PARSER_NAMES)}") from None


def resolve_parser(name: str, chat_template: str | None) -> type[ToolCallParser]:
    """`name`'s parser; for `auto`, the template's: `<tool_call>` in it is Hermes,
    `[TOOL_CALLS]` Mistral, Llama-3's markers are Llama-3 JSON. Any other template
    (SmolLM2's, which renders no tools but whose model was trained on Hermes-style
    calls) gets Hermes."""
    if name != "auto":
        return parser_class(name)
    template = chat_template or ""
    if "<tool_call>" in template:
        return HermesParser
    if TOOL_CALLS in template:
        return MistralParser
    if any(marker in template for marker in _LLAMA3_MARKERS):
        return Llama3JsonParser
    return HermesParser


def make_parser(name: str) -> ToolCallParser:
    return parser_class(name)()
