"""The Hermes format, which Qwen2/2.5/3's templates (and NousResearch's Hermes, and
SmolLM2's training data) use: each call is a JSON object between `<tool_call>` and
`</tool_call>`, anywhere in the output, several per message:

    Let me check.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Content is the text outside the calls. Whitespace next to a call (the template's
newlines) is not content, so a message of calls only has no content.
"""

from __future__ import annotations

from rtpllm.tools.base import CallFormat, Event, JsonCallParser
from rtpllm.tools.json_scan import held_prefix

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesParser(JsonCallParser):
    """States: `text` (outside calls), `head` (after `<tool_call>`, until the name is
    known), `args` (forwarding the arguments object), `tail` (after it, until
    `</tool_call>`), and `whole` (a call not written name first: read with `json` once
    it closes)."""

    name = "hermes"
    call_format = CallFormat(
        prefix=OPEN + "\n", suffix="\n" + CLOSE, separator="\n", arguments_key="arguments", parallel=True
    )

    def __init__(self) -> None:
        super().__init__("text")
        self._after_call = False  # whitespace right after a call is not content

    def finish(self) -> list[Event]:
        self._run()
        if self._state == "text":
            self._content(self._pending)
        elif self._state in ("head", "whole") and not self._json_calls(self._pending):
            self._content(OPEN + self._pending)  # never closed, and not a call: text after all
        # `args`: arguments cut short (max_tokens); `tail`: the rest of a call's closing.
        self._pending = ""
        return self._take()

    # Each step consumes what it can and says whether the state moved on.

    def _text(self) -> bool:
        if self._after_call:
            self._pending = self._pending.lstrip()
            if not self._pending:
                return False
            self._after_call = False
        k = self._pending.find(OPEN)
        if k >= 0:
            self._content(self._pending[:k].rstrip())
            self._pending = self._pending[k + len(OPEN) :]
            self._state = "head"
            return True
        held = held_prefix(self._pending, OPEN)
        # Trailing whitespace is held too: it is content only if text follows it.
        ready = self._pending[: len(self._pending) - held].rstrip()
        self._content(ready)
        self._pending = self._pending[len(ready) :]
        return False

    def _tail(self) -> bool:
        close, reopen = self._pending.find(CLOSE), self._pending.find(OPEN)
        if close >= 0 and (reopen < 0 or close < reopen):
            self._pending = self._pending[close + len(CLOSE) :]
            self._state, self._after_call = "text", True
            return True
        if reopen >= 0:  # the next call, the last one left unclosed
            self._pending = self._pending[reopen + len(OPEN) :]
            self._state = "head"
            return True
        keep = max(held_prefix(self._pending, CLOSE), held_prefix(self._pending, OPEN))
        self._pending = self._pending[len(self._pending) - keep :]
        return False

    def _whole(self) -> bool:
        k = self._pending.find(CLOSE)
        if k < 0:
            return False
        body, self._pending = self._pending[:k], self._pending[k + len(CLOSE) :]
        if self._json_calls(body):
            self._after_call = True
        else:
            self._content(OPEN + body + CLOSE)
        self._state = "text"
        return True
