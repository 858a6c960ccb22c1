"""The Llama-3 JSON format (Llama 3.1/3.2/3.3's templates): a call is the whole message,
a JSON object with the function's name and its `parameters`, optionally after
`<|python_tag|>` (a special token, gone from the text unless skip_special_tokens is
false), several separated by `;`:

    {"name": "get_weather", "parameters": {"city": "Paris"}}

A message that does not start with `{` (or the tag) is content. One that starts with
`{` but is not a call written name first is held to the end and read with `json`:
a call if it is one (any key order; `arguments` is accepted for `parameters`), else
content, so an answer that is a JSON object is never lost.
"""

from __future__ import annotations

from rtpllm.tools.base import CallFormat, Event, JsonCallParser

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(JsonCallParser):
    """States: `start` (before the first character that decides), `head`, `args`,
    `tail` (until the call object's `}`), `after` (a `;` and the next call, or text),
    `text` (content to the end) and `whole` (held to the end)."""

    name = "llama3_json"
    # Llama 3.1's template renders one call per assistant message: the grammar forces one.
    call_format = CallFormat(prefix="", suffix="", separator="; ", arguments_key="parameters", parallel=False)
    argument_keys = ("parameters", "arguments")

    def __init__(self) -> None:
        super().__init__("start")
        self._skipped = ""  # leading whitespace and tag: content again if no call follows

    def finish(self) -> list[Event]:
        self._run()
        if self._state in ("start", "text"):
            self._content(self._skipped + self._pending)
        elif self._state in ("head", "whole") and not self._json_calls(self._pending):
            self._content(self._skipped + self._pending)
        self._pending = ""
        return self._take()

    def _start(self) -> bool:
        rest = self._pending.lstrip()
        if not rest or (PYTHON_TAG.startswith(rest) and rest != PYTHON_TAG):
            return False
        lead = len(self._pending) - len(rest)
        if rest.startswith(PYTHON_TAG):
            lead += len(PYTHON_TAG)
        if not rest.startswith(PYTHON_TAG) and rest[0] != "{":
            self._state = "text"
            return True
        self._skipped, self._pending = self._pending[:lead], self._pending[lead:]
        self._state = "head"
        return True

    def _tail(self) -> bool:
        return self._to_call_end()

    def _after(self) -> bool:
        rest = self._pending.lstrip()
        if not rest:
            self._pending = ""
            return False
        if rest[0] == ";":
            self._pending, self._skipped = rest[1:], ""
            self._state = "head"
        else:
            self._pending, self._skipped = rest, ""
            self._state = "text"
        return True

    def _text(self) -> bool:
        self._content(self._skipped + self._pending)
        self._pending = self._skipped = ""
        return False
