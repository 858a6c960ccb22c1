"""The Mistral format (the templates of Mistral 7B Instruct v0.3, Mixtral 8x22B, Mistral
Nemo and Small): `[TOOL_CALLS]`, then a JSON list of calls written name first:

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]

Tokenizers from v11 on (Mistral Small 3.1+, Magistral, Devstral) write each call as
`[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}`, one after another; both are read.

`[TOOL_CALLS]` is a special token: with skip_special_tokens (the default) its text is
gone, so an output that starts with `[` is read as a list of calls too, and is content
again if it is not one (an answer that is a JSON list is never lost). Text before the
marker is content.
"""

from __future__ import annotations

import re

from rtpllm.tools.base import CallFormat, Event, JsonCallParser
from rtpllm.tools.json_scan import ObjectScanner, held_prefix

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"
# A v11 call's function name, before `[ARGS]` (held while it may still be one).
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


class MistralParser(JsonCallParser):
    """States: `start` (before the first character that decides), `text` (content,
    watching for the marker), `open` (after the marker or a leading `[`: the form of
    the calls), `head`/`args` (a call written name first), `tail` (to the call's `}`),
    `after` (`,` and the next call of a list, `]`, or the next `[TOOL_CALLS]`), `name`
    (a v11 call's name, until `[ARGS]`) and `whole` (held to the end, read with `json`)."""

    name = "mistral"
    # The grammar writes the list without the marker: with skip_special_tokens that is
    # what a client sees of a model's own calls, and this parser reads it the same way.
    call_format = CallFormat(
        prefix="", suffix="", separator=", ", arguments_key="arguments", parallel=True, opening="[", closing="]",
        special_markers=True,
    )

    def __init__(self) -> None:
        super().__init__("start")
        self._skipped = ""  # marker, whitespace and `[` consumed: content again if no call follows
        self._form = ""  # "list", "object" (one call, no list) or "v11"

    def finish(self) -> list[Event]:
        self._run()
        if self._state in ("start", "text", "open", "name"):
            self._content(self._skipped + self._pending)
        elif self._state in ("head", "whole"):
            body = ("[" if self._form == "list" else "") + self._pending
            if not self._json_calls(body):
                self._content(self._skipped + self._pending)
        # `args`: arguments cut short (max_tokens); `tail`/`after`: the rest of a call's closing.
        self._pending = self._skipped = ""
        return self._take()

    def _start(self) -> bool:
        rest = self._pending.lstrip()
        if not rest or (TOOL_CALLS.startswith(rest) and rest != TOOL_CALLS):
            return False
        lead = len(self._pending) - len(rest)
        if rest.startswith(TOOL_CALLS):
            lead += len(TOOL_CALLS)
        elif rest[0] != "[":
            self._state = "text"
            return True
        self._skipped, self._pending = self._pending[:lead], self._pending[lead:]
        self._state = "open"
        return True

    def _text(self) -> bool:
        k = self._pending.find(TOOL_CALLS)
        if k >= 0:
            self._content(self._pending[:k].rstrip())
            self._skipped, self._pending = TOOL_CALLS, self._pending[k + len(TOOL_CALLS) :]
            self._state = "open"
            return True
        # Trailing whitespace is held too: it is content only if text follows it.
        ready = self._pending[: len(self._pending) - held_prefix(self._pending, TOOL_CALLS)].rstrip()
        self._content(ready)
        self._pending = self._pending[len(ready) :]
        return False

    def _open(self) -> bool:
        rest = self._pending.lstrip()
        if not rest:
            return False
        lead = len(self._pending) - len(rest)
        if rest[0] == "[":
            self._form, self._state = "list", "head"
            self._skipped += self._pending[: lead + 1]
            self._pending = rest[1:]
        elif rest[0] == "{":
            self._form, self._state = "object", "head"
            self._skipped += self._pending[:lead]
            self._pending = rest
        elif self._skipped.endswith(TOOL_CALLS):
            self._form, self._state = "v11", "name"
        else:
            self._to_text()
        return True

    def _name(self) -> bool:
        k = self._pending.find(ARGS)
        candidate = self._pending[:k] if k >= 0 else self._pending[: len(self._pending) - held_prefix(self._pending, ARGS)]
        if not _NAME.fullmatch(candidate.strip() or "x"):
            self._to_text()  # not a v11 call after all
            return True
        if k < 0:
            return False
        self._begin(candidate.strip())
        self._pending = self._pending[k + len(ARGS) :].lstrip()
        self._skipped = ""
        self._scanner = ObjectScanner()
        self._state = "args"
        return True

    def _tail(self) -> bool:
        if self._form == "v11":  # the arguments were the whole call
            self._state = "after"
            return True
        return self._to_call_end()

    def _after(self) -> bool:
        rest = self._pending.lstrip()
        if not rest:
            self._pending = ""
            return False
        if self._form == "list" and rest[0] == ",":
            self._pending, self._skipped = rest[1:], ""
            self._state = "head"
        elif self._form == "list" and rest[0] == "]":
            self._pending, self._skipped = rest[1:].lstrip(), ""
            self._state = "text"
        elif TOOL_CALLS.startswith(rest[: len(TOOL_CALLS)]):
            if len(rest) < len(TOOL_CALLS):
                return False  # maybe the next call's marker
            self._pending, self._skipped = rest[len(TOOL_CALLS) :], TOOL_CALLS
            self._state = "open"
        else:
            self._pending, self._skipped = rest, ""
            self._state = "text"
        return True

    def _to_text(self) -> None:
        """What was consumed is content after all; the rest is read as text (which
        does not look for calls at its start again)."""
        self._content(self._skipped)
        self._skipped = ""
        self._state = "text"
