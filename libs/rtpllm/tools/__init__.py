"""Tool calling: reading the calls a model writes in its chat template's format, and
forcing that format when a request requires a call (docs/tool_calling.md).

`base.py` holds the parser events and what every format shares, `json_scan.py` finds
a call's name and the extent of its arguments in text that arrives in pieces,
`hermes.py`, `llama3.py` and `mistral.py` are the formats, `registry.py` picks one by name or
from the chat template, and `grammar.py` writes the grammar that forces a call.
"""

from rtpllm.tools.base import CallArguments, CallFormat, CallStart, Content, ToolCallParser
from rtpllm.tools.registry import PARSER_NAMES, make_parser, parser_class, resolve_parser

__all__ = [
    "PARSER_NAMES",
    "CallArguments",
    "CallFormat",
    "CallStart",
    "Content",
    "ToolCallParser",
    "make_parser",
    "parser_class",
    "resolve_parser",
]
