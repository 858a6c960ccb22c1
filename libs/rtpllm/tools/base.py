"""What every tool-call format shares: the parser's events, the call format the grammar
forces, and reading whole calls with `json` when the streaming path cannot.

A parser reads one choice's output text as it arrives (`feed`, then `finish` at the
end) and says what it is, as events in output order: `Content` (text outside calls),
`CallStart` (a call's index and name, as soon as the name is known) and
`CallArguments` (the next piece of that call's arguments, as the model wrote them).
Text that might still turn out to be a call is held back until it is known, so no
event is ever taken back: a non-streamed response is the same events, collected.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rtpllm.tools.json_scan import NEED_MORE, CallHead, ObjectScanner, scan_call_head


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str


Event = Content | CallStart | CallArguments


@dataclass(frozen=True)
class CallFormat:
    """How a family's chat template has the model write its calls: each call is
    `prefix + {"name": ..., "<arguments_key>": {...}} + suffix`, several joined by
    `separator` where the template renders several in one message (`parallel`), all
    between `opening` and `closing` (Mistral's list). `special_markers`: the format's
    markers are special tokens, so a request with tools keeps special tokens in the
    text unless it sets skip_special_tokens itself."""

    prefix: str
    suffix: str
    separator: str
    arguments_key: str
    parallel: bool
    opening: str = ""
    closing: str = ""
    special_markers: bool = False


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass
class ParsedOutput:
    """A whole output's content (text outside calls) and calls."""

    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


class ToolCallParser(ABC):
    """Reads one output's tool calls; one instance per choice."""

    name: ClassVar[str]
    call_format: ClassVar[CallFormat]
    # Keys a model may use for the arguments (Llama-3 writes "parameters").
    argument_keys: ClassVar[tuple[str, ...]] = ("arguments", "parameters")

    def __init__(self) -> None:
        self._events: list[Event] = []
        self.num_calls = 0

    @abstractmethod
    def feed(self, text: str) -> list[Event]:
        """The events that the output's next piece of text settles."""

    @abstractmethod
    def finish(self) -> list[Event]:
        """The events of whatever was held back, at the end of the output."""

    def parse(self, text: str) -> ParsedOutput:
        """A whole output at once (a fresh parser's only call)."""
        return collect([*self.feed(text), *self.finish()])

    # -- for the formats ---------------------------------------------------------------

    def _content(self, text: str) -> None:
        if text:
            self._events.append(Content(text))

    def _begin(self, name: str) -> None:
        self._events.append(CallStart(self.num_calls, name))
        self.num_calls += 1

    def _arguments(self, text: str) -> None:
        if text:
            self._events.append(CallArguments(self.num_calls - 1, text))

    def _json_calls(self, body: str) -> bool:
        """Emit the calls `body` holds as JSON (one call object, or a list of them, as
        SmolLM2 writes); False, emitting nothing, when it is not that."""
        calls = calls_in_json(body, self.argument_keys)
        if calls is None:
            return False
        for call in calls:
            self._begin(call.name)
            self._arguments(call.arguments)
        return True

    def _take(self) -> list[Event]:
        out, self._events = self._events, []
        return out


class JsonCallParser(ToolCallParser):
    """A state machine over the held-back text, for formats whose calls are JSON objects
    written name first: `head` waits until the call's name is known, `args` forwards
    the arguments object as it streams. A format adds its own states (one method
    `_<state>` each, which consumes what it can and says whether the state moved on)."""

    def __init__(self, state: str) -> None:
        super().__init__()
        self._state = state
        self._pending = ""
        self._scanner = ObjectScanner()

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        self._run()
        return self._take()

    def _run(self) -> None:
        while getattr(self, f"_{self._state}")():
            pass

    def _head(self) -> bool:
        head = scan_call_head(self._pending, self.argument_keys)
        if head is NEED_MORE:
            return False
        if isinstance(head, CallHead):
            self._begin(head.name)
            self._pending = self._pending[head.arguments_at :]
            self._scanner = ObjectScanner()
            self._state = "args"
        else:
            self._state = "whole"  # not name first: read with `json` once it closes
        return True

    def _args(self) -> bool:
        n = self._scanner.feed(self._pending)
        self._arguments(self._pending[:n])
        self._pending = self._pending[n:]
        if self._scanner.done:
            self._state = "tail"
            return True
        return False

    def _to_call_end(self) -> bool:
        """After a call's arguments: skip to the call object's closing `}`, then `after`
        (the formats without a closing tag)."""
        k = self._pending.find("}")
        if k < 0:
            self._pending = ""
            return False
        self._pending = self._pending[k + 1 :]
        self._state = "after"
        return True

    def _whole(self) -> bool:
        """A call not written name first: held to the end, where finish() reads it."""
        return False


def calls_in_json(body: str, argument_keys: tuple[str, ...]) -> list[ParsedCall] | None:
    """The calls in a JSON text: an object with a string `name` and an object of
    arguments under one of `argument_keys` (missing: none), or a non-empty list of them."""
    try:
        value: Any = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) and value else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return None
        key = next((k for k in argument_keys if k in item), None)
        arguments = item[key] if key is not None else {}
        if not isinstance(arguments, dict) or set(item) - {"name", *argument_keys}:
            return None
        calls.append(ParsedCall(item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


def collect(events: list[Event]) -> ParsedOutput:
    """The content and calls that events add up to."""
    out = ParsedOutput()
    names: list[str] = []
    arguments: list[list[str]] = []
    content: list[str] = []
    for event in events:
        if isinstance(event, Content):
            content.append(event.text)
        elif isinstance(event, CallStart):
            names.append(event.name)
            arguments.append([])
        else:
            arguments[event.index].append(event.text)
    out.content = "".join(content)
    out.calls = [ParsedCall(n, "".join(a)) for n, a in zip(names, arguments, strict=True)]
    return out
