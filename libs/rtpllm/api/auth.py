"""API keys: who may use the gateway's HTTP API.

A request carries its key as `Authorization: Bearer <key>`, as OpenAI's clients send
their `api_key`. Without one of the configured keys it gets 401 in OpenAI's error format
(code `invalid_api_key`) before any route sees it. Every path needs a key except the
open ones (`/health` and `/ready`, for healthchecks; `/metrics` and `/instances` too
unless they are protected). With no key configured the API is open.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from rtpllm.api.errors import APIError
from rtpllm.api.server import error_response

ALWAYS_OPEN = frozenset({"/health", "/ready"})
METRICS_PATHS = frozenset({"/metrics", "/instances"})


def load_api_keys(keys: str | None, key_file: str | Path | None) -> tuple[str, ...]:
    """The keys of `--api-key` (comma-separated) and `--api-key-file` (one a line, blank
    lines and `#` comments skipped), in that order, each once. ValueError for a key
    that cannot travel in a header, and for a key file that holds none: a deployment
    that meant to be protected must not come up open."""
    found: list[str] = [k.strip() for k in (keys or "").split(",") if k.strip()]
    if key_file:
        lines = Path(key_file).expanduser().read_text().splitlines()
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise ValueError(f"the API key file {key_file} holds no key")
        found += from_file
    for key in found:
        if not key.isascii() or not key.isprintable() or " " in key:
            raise ValueError("an API key must be printable ASCII without spaces (it travels in a header)")
    return tuple(dict.fromkeys(found))


class APIKeys:
    """The accepted keys. Only their SHA-256 digests are kept, and a presented key is
    compared with every one of them in constant time, so the time taken says nothing
    about how much of a key was right, nor which key matched."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def valid(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode()).digest()
        ok = False
        for known in self._digests:  # no early exit
            ok |= hmac.compare_digest(known, digest)
        return ok


def missing_api_key() -> APIError:
    return APIError(
        401,
        "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
        "(Authorization: Bearer YOUR_KEY).",
        "invalid_request_error",
        None,
        "invalid_api_key",
        {"WWW-Authenticate": "Bearer"},
    )


def invalid_api_key() -> APIError:
    # The key is not echoed back, not even in part: the error may end up in a log.
    return APIError(
        401,
        "Incorrect API key provided.",
        "invalid_request_error",
        None,
        "invalid_api_key",
        {"WWW-Authenticate": "Bearer"},
    )


def bearer_token(scope: Scope) -> str | None:
    """The credentials of the request's `Authorization: Bearer ...` header, if any."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
            return None
    return None


class APIKeyMiddleware:
    """ASGI middleware: HTTP requests to any path but `open_paths` need a valid key.
    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would put every
    streamed chunk through an extra task and queue."""

    def __init__(self, app: ASGIApp, keys: APIKeys, open_paths: Sequence[str] = tuple(ALWAYS_OPEN)) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = bearer_token(scope)
        if presented is not None and self.keys.valid(presented):
            await self.app(scope, receive, send)
            return
        error = missing_api_key() if presented is None else invalid_api_key()
        await error_response(error)(scope, receive, send)


def open_paths(protect_metrics: bool) -> frozenset[str]:
    """The paths that need no key."""
    return ALWAYS_OPEN if protect_metrics else ALWAYS_OPEN | METRICS_PATHS
