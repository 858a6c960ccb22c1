"""Helpers shared by the serving benchmarks that drive whole stacks over HTTP
(bench/pd_interference.py, bench/prefix_routing.py, bench/serving_tax.py)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from rtpllm.runtime.processes import redis_server_binary


def new_client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=30.0))


@dataclass
class StreamLog:
    """One streamed request as the client saw it: send time, each content chunk's
    arrival, and the usage chunk's completion tokens (when asked for)."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    finished: bool = False
    completion_tokens: int = 0
    error: str | None = None
    done: bool = False  # the stream's `data: [DONE]` arrived

    def describe(self) -> str:
        """What went wrong, for a test's failure message ("" when nothing did)."""
        if self.error:
            return self.error
        if self.finished:
            return ""
        ended = "then [DONE]" if self.done else "and no [DONE]"
        return f"no finish_reason: {len(self.chunks)} chunks, {ended} (sent at {self.sent:.3f})"


def completion_body(model: str, prompt: list[int], max_tokens: int, usage: bool = False) -> bytes:
    """A streamed, greedy /v1/completions body that generates exactly `max_tokens`.

    skip_special_tokens off: random weights mostly sample the byte tokenizer's reserved
    special tokens, whose text would be empty, and the gateway sends no chunk for empty
    text, so the client would not see those tokens arrive."""
    body: dict[str, Any] = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
        "temperature": 0, "ignore_eos": True, "skip_special_tokens": False,
    }  # fmt: skip
    if usage:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


_JSON = {"content-type": "application/json"}


async def stream_request(client: httpx.AsyncClient, url: str, body: bytes, log: StreamLog) -> None:
    """POST one streamed completion, stamping each content chunk and reading the usage
    chunk. Lines are searched, not parsed as JSON: the client shares the machine with
    the stack and must stay cheap."""
    try:
        async with client.stream("POST", url, content=body, headers=_JSON) as r:
            if r.status_code != 200:
                log.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    log.done = log.done or line == "data: [DONE]"
                    continue
                if '"text":' in line:
                    log.chunks.append(time.perf_counter())
                    if '"finish_reason":"' in line:
                        log.finished = True
                elif '"choices":[]' in line:
                    log.completion_tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                elif line.startswith('data: {"error"'):
                    log.error = line[6:306]
    except httpx.HTTPError as exc:
        log.error = f"{type(exc).__name__}: {exc}"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def strict_json(value: Any) -> Any:
    """NaN (nothing measured) as null: json.dumps would write NaN, which is not JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return value


def redis_installed() -> bool:
    """False on machines without a redis-server binary (the GPU machine): stacks run without it."""
    try:
        redis_server_binary()
    except FileNotFoundError:
        return False
    return True


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
