"""One log line per HTTP request at the gateway, when it has been answered:

    rtpllm.access: 127.0.0.1:50312 "POST /v1/chat/completions" 200 id=chatcmpl-1f0c...
        prompt_tokens=24 completion_tokens=16 ttft=0.041s latency=0.212s

(on one line). The status is the one the request ended with: a stream that failed after
its 200 was sent logs the error's status, 499 a client that went away. Token counts,
TTFT and the response id are `-` for requests that generated nothing. Probes
(`/health`, `/ready`, `/metrics`, `/instances`, which healthchecks, scrapers and `rtpllm
up`'s supervisor poll every few seconds) log at DEBUG, so they do not flood the log.

Plain ASGI middleware (not BaseHTTPMiddleware, which would put every streamed chunk
through an extra task), outermost: requests refused for their API key are logged too.
Uvicorn's own access log stays off; this line replaces it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from rtpllm.api.generation import Generation

log = logging.getLogger("rtpllm.access")

PROBES = frozenset({"/health", "/ready", "/metrics", "/instances"})
_KEY = "rtpllm_access"


@dataclass
class AccessRecord:
    """What a route adds to its request's line."""

    response_id: str | None = None
    generation: Generation | None = None
    status: int | None = None  # the outcome, when it differs from the HTTP status sent
    echo_only: bool = False  # completion tokens the engine ran but the client did not get


def access_record(request: Request) -> AccessRecord | None:
    """The request's record, when access logging is on."""
    record = request.scope.get("state", {}).get(_KEY)
    return record if isinstance(record, AccessRecord) else None


def format_line(
    client: str, method: str, path: str, status: int, record: AccessRecord, latency_s: float
) -> str:
    gen = record.generation
    prompt = completion = ttft = "-"
    if gen is not None:
        usage = gen.total_usage()
        prompt = str(usage.prompt_tokens or sum(len(p.token_ids) for p in gen.prompts))
        completion = "0" if record.echo_only else str(usage.completion_tokens)
        if gen.ttft_s is not None:
            ttft = f"{gen.ttft_s:.3f}s"
    return (
        f'{client} "{method} {path}" {status} id={record.response_id or "-"} '
        f"prompt_tokens={prompt} completion_tokens={completion} ttft={ttft} latency={latency_s:.3f}s"
    )


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        record = AccessRecord()
        scope.setdefault("state", {})[_KEY] = record
        sent = 500  # what an exception before the response start becomes

        async def send_status(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.start":
                sent = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "").encode("unicode_escape").decode("ascii")  # no forged lines
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            line = format_line(
                where, scope.get("method", "-"), path, record.status or sent, record, time.monotonic() - start
            )
            log.log(logging.DEBUG if path in PROBES else logging.INFO, "%s", line)
