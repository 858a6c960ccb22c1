"""Finding a tool call's parts in JSON that arrives a few characters at a time.

A streamed call is announced as soon as its name is known and its arguments are
forwarded as they are written, so the parsers cannot wait for the whole JSON object.
Two small scanners tell them what they need from a prefix:

- `scan_call_head`: does the text start `{"name": "<name>", "<arguments key>": {`?
  Yes (with the name, and where the arguments begin), not yet (every character so far
  fits), or no (the parser then waits for the whole call and reads it with `json`).
- `ObjectScanner`: where does the JSON object that starts here end? Strings and
  nesting are tracked; nothing is validated (the client gets the model's text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final


class _NeedMore:
    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = _NeedMore()
"""Every character so far is consistent with the pattern; more are needed to decide."""

_WS = " \t\r\n"


@dataclass(frozen=True)
class CallHead:
    """`{"name": ..., "<key>": ` recognised: the function's name, and the index of the
    arguments object's opening brace."""

    name: str
    arguments_at: int


def scan_call_head(text: str, argument_keys: tuple[str, ...]) -> CallHead | _NeedMore | None:
    """Whether `text` starts with a call object whose first key is "name" and whose
    second is one of `argument_keys`, its value an object. Leading whitespace is skipped."""
    i = _skip_ws(text, 0)
    for step in ("{", '"name"', ":"):
        i = _expect(text, _skip_ws(text, i), (step,))
        if not isinstance(i, int):
            return i
    found = _json_string(text, _skip_ws(text, i))
    if not isinstance(found, tuple):
        return found
    name, i = found
    i = _expect(text, _skip_ws(text, i), (",",))
    if not isinstance(i, int):
        return i
    i = _expect(text, _skip_ws(text, i), tuple(json.dumps(key) for key in argument_keys))
    if not isinstance(i, int):
        return i
    i = _expect(text, _skip_ws(text, i), (":",))
    if not isinstance(i, int):
        return i
    i = _skip_ws(text, i)
    if i == len(text):
        return NEED_MORE
    return CallHead(name, i) if text[i] == "{" else None


class ObjectScanner:
    """Feeds text that starts with a JSON object's `{` and says where the object ends."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.done = False

    def feed(self, text: str) -> int:
        """How many characters of `text` belong to the object (all of them until it
        closes; `done` is then true)."""
        for k, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return k + 1
        return len(text)


def held_prefix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that `marker` starts with (text that
    might become the marker and must be held back until it is known)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _expect(text: str, i: int, options: tuple[str, ...]) -> int | _NeedMore | None:
    """The index after whichever of `options` is at `i`."""
    rest = text[i:]
    for option in options:
        if rest.startswith(option):
            return i + len(option)
    return NEED_MORE if any(option.startswith(rest) for option in options) else None


def _json_string(text: str, i: int) -> tuple[str, int] | _NeedMore | None:
    """The JSON string at `i` (its value, and the index after it)."""
    if i == len(text):
        return NEED_MORE
    if text[i] != '"':
        return None
    k = i + 1
    while k < len(text):
        if text[k] == "\\":
            k += 2
            continue
        if text[k] == '"':
            try:
                return json.loads(text[i : k + 1]), k + 1
            except ValueError:
                return None
        k += 1
    return NEED_MORE
