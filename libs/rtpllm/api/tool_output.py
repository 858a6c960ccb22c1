"""One choice's output read for tool calls: the parser's events as OpenAI's message
fields (`content`, `tool_calls`) or as the deltas OpenAI streams.

A streamed call's first delta carries its `index`, `id`, `type` and `function.name`
with `arguments: ""`; later deltas carry only pieces of `function.arguments`. Text
outside calls streams as `content`. The same events make the non-streamed message, so
a stream adds up to exactly the response that was not streamed.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass

from msgspec import UNSET

from rtpllm.api.responses import ChatDelta, FunctionCall, FunctionDelta, ToolCall, ToolCallDelta
from rtpllm.tools.base import CallArguments, CallStart, Content, Event, ToolCallParser

_ID_ALPHABET = string.ascii_letters + string.digits


def call_id() -> str:
    """OpenAI's form: `call_` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolParsing:
    """How a request's outputs are read: the model's parser, and at most how many calls
    are kept (parallel_tool_calls false: one)."""

    parser: type[ToolCallParser]
    max_calls: int | None = None

    def output(self) -> ToolOutput:
        return ToolOutput(self.parser(), self.max_calls)


class ToolOutput:
    """One choice's parser, the ids it gave its calls, and what it has seen."""

    def __init__(self, parser: ToolCallParser, max_calls: int | None = None) -> None:
        self._parser = parser
        self._max_calls = max_calls
        self._ids: list[str] = []
        self._names: list[str] = []
        self._arguments: list[list[str]] = []
        self._content: list[str] = []

    @property
    def called(self) -> bool:
        return bool(self._ids)

    def feed(self, text: str) -> list[ChatDelta]:
        """The deltas that the output's next text settles (none while it is held)."""
        return self._deltas(self._parser.feed(text)) if text else []

    def finish(self) -> list[ChatDelta]:
        """The deltas of what was held back, at the end of the output."""
        return self._deltas(self._parser.finish())

    def finish_reason(self, reason: str) -> str:
        """OpenAI's "tool_calls" for an output that called tools and ended on its own."""
        return "tool_calls" if self.called and reason == "stop" else reason

    def message(self, prefix: str = "") -> tuple[str | None, list[ToolCall] | None]:
        """The whole output's `content` (null when it is only calls) and `tool_calls`
        (None without any), once everything was fed and finished. `prefix`: echoed
        text that leads the content."""
        text = prefix + "".join(self._content)
        if not self._ids:
            return text, None
        calls = [
            ToolCall(id=i, function=FunctionCall(name=n, arguments="".join(a)))
            for i, n, a in zip(self._ids, self._names, self._arguments, strict=True)
        ]
        return (text if text.strip() else None), calls

    def _deltas(self, events: list[Event]) -> list[ChatDelta]:
        deltas: list[ChatDelta] = []
        for event in events:
            if isinstance(event, Content):
                self._content.append(event.text)
                last = deltas[-1] if deltas else None
                if last is not None and isinstance(last.content, str):
                    last.content += event.text
                else:
                    deltas.append(ChatDelta(content=event.text))
            elif self._max_calls is not None and event.index >= self._max_calls:
                continue  # past the calls allowed (parallel_tool_calls false): dropped
            elif isinstance(event, CallStart):
                self._ids.append(call_id())
                self._names.append(event.name)
                self._arguments.append([])
                function = FunctionDelta(name=event.name, arguments="")
                deltas.append(
                    ChatDelta(tool_calls=[ToolCallDelta(event.index, function, self._ids[-1], "function")])
                )
            elif isinstance(event, CallArguments):
                self._arguments[event.index].append(event.text)
                last = deltas[-1] if deltas else None
                if (
                    last is not None
                    and isinstance(last.tool_calls, list)
                    and last.tool_calls[0].index == event.index
                    and last.tool_calls[0].id is UNSET  # a call's first delta keeps `arguments: ""`
                ):
                    last.tool_calls[0].function.arguments += event.text  # type: ignore[operator]
                else:
                    function = FunctionDelta(arguments=event.text)
                    deltas.append(ChatDelta(tool_calls=[ToolCallDelta(event.index, function)]))
        return deltas
