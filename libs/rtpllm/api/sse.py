"""Server-sent events as OpenAI streams them, and a response that always closes its
event source promptly (so a client disconnect cancels the request on its instance)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from rtpllm.api.errors import APIError

DONE = b"data: [DONE]\n\n"
_json = msgspec.json.Encoder()


# Characters that JSON leaves raw but that line readers built on str.splitlines (httpx's
# `iter_lines` and `aiter_lines`) take for line breaks: U+0085 (NEL), U+2028,
# U+2029, as their UTF-8 bytes. Generated text holds them now and then (any byte-level
# tokenizer can emit them); raw, such a client reads one event as two lines and loses the
# second half (a chunk's finish_reason). Escaped, the JSON decodes to the same text.
_LINE_BREAKS_UTF8 = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def sse_event(payload: msgspec.Struct | dict) -> bytes:
    """One `data: {...}` event (JSON without spaces, as OpenAI sends it), with no
    character in it that a splitlines-based reader would break the line at."""
    data = _json.encode(payload)
    if b"\xc2\x85" in data or b"\xe2\x80" in data:
        for raw, escaped in _LINE_BREAKS_UTF8:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


def sse_error(error: APIError) -> bytes:
    """An error inside a stream: the openai client raises APIError on `{"error": ...}`."""
    return sse_event(error.body())


class SSEResponse(Response):
    """An ASGI response streaming `events` as text/event-stream.

    Unlike Starlette's StreamingResponse it watches for the client going away while the
    source is idle (a long prefill sends nothing), and it always `aclose()`s the source,
    so the source's `finally` (cancel on the instance, release admission) runs at once.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], status_code: int = 200) -> None:
        # Response.__init__ is skipped on purpose: it would set a Content-Length.
        self.events = events
        self.status_code = status_code
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # nginx and friends must not buffer the stream
        ]
        producer = asyncio.create_task(self._produce(send, headers))
        watcher = asyncio.create_task(_wait_disconnect(receive))
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not producer.done():
                producer.cancel()
            with contextlib.suppress(BaseException):
                await producer
            with contextlib.suppress(BaseException):
                await self.events.aclose()  # type: ignore[attr-defined]

    async def _produce(self, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
        try:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except OSError:  # the client went away mid-write
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
