"""SSE events carry generated text that a splitlines-based line reader (httpx's
`aiter_lines`, which our bench client and many user scripts read streams with) must not
split: U+0085, U+2028 and U+2029 are line breaks to it, and JSON leaves them raw. Found
by tests/integration/test_hung_redis.py under load: a random-weight model's last chunk
held one, and the client lost its finish_reason."""

from __future__ import annotations

import json

import msgspec
import pytest
from httpx._decoders import LineDecoder

from rtpllm.api.sse import sse_event

TEXTS = ["a\u2028b", "\x85", "x\u2029", "tail \u2028\u2029\x85 end", "\u2026 and \u20ac stay raw"]


def lines(stream: bytes) -> list[str]:
    decoder = LineDecoder()
    return [line for line in decoder.decode(stream.decode()) + decoder.flush() if line]


@pytest.mark.parametrize("text", TEXTS)
def test_an_event_is_one_line_and_decodes_to_the_same_text(text: str) -> None:
    payload = {"choices": [{"index": 0, "text": text, "finish_reason": "length"}]}
    event = sse_event(payload)
    (line,) = lines(event)
    assert line.startswith("data: {") and json.loads(line[6:]) == payload


def test_raw_json_would_be_split() -> None:
    """Without the escaping the same reader splits the event: what the test above pins."""
    raw = b"data: " + msgspec.json.encode({"text": "a\u2028b", "finish_reason": "length"}) + b"\n\n"
    assert len(lines(raw)) == 2


def test_other_non_ascii_text_is_left_as_utf8() -> None:
    assert "\u20ac".encode() in sse_event({"text": "\u20ac \u2026"})
