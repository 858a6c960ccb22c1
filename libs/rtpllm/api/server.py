"""The OpenAI-compatible endpoints' logic, independent of how routes are mounted.

Order of checks, so each failure gets its status: body size (413) -> body (400) -> model
(404) -> parameters (400) -> images (400: fetched on the loop, large ones decoded in a
thread, before the prompt is built) -> prompt (400; one provably too long for the context window
is refused before it is tokenized) -> a live instance (503) -> context length (400) ->
sequences (400) -> admission (429) -> submit (503/429/400/504) -> stream (errors in-band
once streaming).

Large bodies are parsed and tokenized off the event loop, so one huge request does not
stall every other stream of the gateway (or the lease bookkeeping that runs on the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from rtpllm.api import errors
from rtpllm.api.chat import chat_chunks, chat_completion
from rtpllm.api.completions import completion, completion_chunks
from rtpllm.api.errors import CLIENT_CLOSED, APIError
from rtpllm.api.generation import GatewayCore, Generation, failed
from rtpllm.api.images import ImageLoader, MediaSettings
from rtpllm.api.logprobs import TokenText
from rtpllm.api.params import chat_sampling_params, completion_sampling_params
from rtpllm.api.prompts import chat_prompt, check_context_length, completion_prompts
from rtpllm.api.requests import ChatCompletionRequest, CompletionRequest, parse_body
from rtpllm.api.responses import ModelCard, ModelList, to_json
from rtpllm.api.sse import SSEResponse
from rtpllm.tokenizer import Tokenizer

T = TypeVar("T")

# Bodies larger than this are parsed, rendered and tokenized off the event loop; below
# it the thread hop costs more than the work.
_THREAD_BODY_BYTES = 32 * 1024
DEFAULT_MAX_BODY_BYTES = 4 << 20


async def _off_loop(body_size: int, fn: Callable[..., T], *args: Any) -> T:
    if body_size > _THREAD_BODY_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 once it is known to exceed `limit` bytes: from
    Content-Length before reading anything, else (chunked) as soon as the bytes read pass
    it. The rest is never buffered (the HTTP server discards it)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise errors.bad_request("Invalid Content-Length header.") from None
        if size > limit:
            raise errors.payload_too_large(limit, size)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise errors.payload_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class ClientDisconnected(Exception):
    """The HTTP client went away before a non-streaming answer was ready."""


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload).encode() if isinstance(payload, dict | list) else to_json(payload)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(error: APIError) -> Response:
    return json_response(error.body(), error.status, error.headers)


class OpenAIServer:
    """Handles chat, completions and models for one served model."""

    def __init__(
        self,
        core: GatewayCore,
        tokenizer: Tokenizer,
        model: str,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        images: ImageLoader | None = None,
    ) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self.model = model
        self.max_body_bytes = max_body_bytes
        # Default: a text model's (every image part is a 400).
        self.images = images if images is not None else ImageLoader(MediaSettings(), model)
        self.token_text = TokenText(tokenizer)
        self.created = int(time.time())

    # -- endpoints -------------------------------------------------------------------

    async def chat(self, request: Request) -> Response | SSEResponse:
        endpoint = "chat"
        try:
            body = await read_body(request, self.max_body_bytes)
            req: ChatCompletionRequest = await _off_loop(len(body), parse_body, ChatCompletionRequest, body)
            model = self._check_model(req.model)
            params = chat_sampling_params(req)
            explicit_max = (
                req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            )
            window = self._known_max_model_len(model)
            images = await self.images.load(req.messages)
            prompt = await _off_loop(
                len(body),
                chat_prompt,
                self.tokenizer,
                req.messages,
                req.add_generation_prompt,
                window,
                explicit_max,
                images,
                self.images.family,
            )
            check_context_length(len(prompt.token_ids), explicit_max, self._max_model_len(model), "messages")
            gen = Generation(self.core, f"chatcmpl-{uuid.uuid4().hex}", model, [prompt], params)
            await gen.start()
        except APIError as exc:
            return self._error(endpoint, exc)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = chat_chunks(
                gen, gen.request_id, self.token_text, include_usage, lambda s: self._count(endpoint, s)
            )
            return SSEResponse(events)
        return await self._complete(
            endpoint, request, gen, chat_completion(gen, gen.request_id, self.token_text)
        )

    async def completions(self, request: Request) -> Response | SSEResponse:
        endpoint = "completions"
        try:
            body = await read_body(request, self.max_body_bytes)
            req: CompletionRequest = await _off_loop(len(body), parse_body, CompletionRequest, body)
            model = self._check_model(req.model)
            params = completion_sampling_params(req)
            window = self._known_max_model_len(model)
            prompts = await _off_loop(
                len(body), completion_prompts, self.tokenizer, req.prompt, window, req.max_tokens
            )
            max_len = self._max_model_len(model)
            for p in prompts:
                check_context_length(len(p.token_ids), req.max_tokens, max_len, "prompt")
            gen = Generation(self.core, f"cmpl-{uuid.uuid4().hex}", model, prompts, params)
            await gen.start()
        except APIError as exc:
            return self._error(endpoint, exc)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = completion_chunks(
                gen,
                gen.request_id,
                self.token_text,
                self.tokenizer,
                req.echo,
                include_usage,
                lambda s: self._count(endpoint, s),
            )
            return SSEResponse(events)
        return await self._complete(
            endpoint, request, gen, completion(gen, gen.request_id, self.token_text, self.tokenizer, req.echo)
        )

    def models(self) -> Response:
        instances = self.core.dispatcher.candidates(self.model)
        max_len = min((i.heartbeat.max_model_len for i in instances), default=None)
        return json_response(
            ModelList(data=[ModelCard(id=self.model, created=self.created, max_model_len=max_len)])
        )

    # -- helpers ---------------------------------------------------------------------

    def _check_model(self, name: str | None) -> str:
        if name is None or name == self.model:
            return self.model
        raise errors.model_not_found(name)

    def _known_max_model_len(self, model: str) -> int | None:
        """The smallest context window among live workers (the request must fit wherever
        the router sends it); None when none is known."""
        return min(
            (inst.heartbeat.max_model_len for inst in self.core.dispatcher.candidates(model)), default=None
        )

    def _max_model_len(self, model: str) -> int:
        window = self._known_max_model_len(model)
        if window is None:
            raise errors.unavailable(
                f"No worker is available for model {model!r}; try again when one has started.",
                retry_after_s=self.core.admission.retry_after_s,
            )
        return window

    async def _complete(
        self, endpoint: str, request: Request, gen: Generation, work: Awaitable[Any]
    ) -> Response:
        """Run a non-streaming request; a client that disconnects cancels it."""
        try:
            result = await _unless_disconnected(request, work)
        except ClientDisconnected:
            gen.close()
            self._count(endpoint, CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:
            return self._error(endpoint, failed(exc))
        finally:
            gen.close()
        self._count(endpoint, 200)
        return json_response(result)

    def _error(self, endpoint: str, error: APIError) -> Response:
        self._count(endpoint, error.status)
        return error_response(error)

    def _count(self, endpoint: str, status: int) -> None:
        self.core.metrics.requests.labels(endpoint, str(status)).inc()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.create_task(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientDisconnected()
