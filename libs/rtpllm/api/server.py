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

from rtpllm import __version__
from rtpllm.api import errors
from rtpllm.api.access_log import AccessRecord, access_record
from rtpllm.api.chat import chat_chunks, chat_completion
from rtpllm.api.completions import CompletionView, completion, completion_chunks
from rtpllm.api.errors import CLIENT_CLOSED, APIError
from rtpllm.api.generation import GatewayCore, Generation, failed
from rtpllm.api.images import ImageLoader, MediaSettings
from rtpllm.api.logprobs import TokenIdText, TokenText
from rtpllm.api.params import chat_sampling_params, completion_sampling_params, echo_only
from rtpllm.api.prompts import (
    chat_prompt,
    check_context_length,
    completion_prompts,
    last_assistant_text,
    template_kwargs,
    truncate_prompt,
)
from rtpllm.api.requests import ChatCompletionRequest, CompletionRequest, parse_body
from rtpllm.api.responses import ModelCard, ModelList, to_json
from rtpllm.api.sse import SSEResponse
from rtpllm.api.stream_usage import StreamUsage
from rtpllm.api.tokenize import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    check_tokenize_chat,
    detokenize,
    tokenize_response,
)
from rtpllm.api.tool_output import ToolParsing
from rtpllm.api.tools import check_tools, tool_request
from rtpllm.tokenizer import Tokenizer
from rtpllm.tools import resolve_parser

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
        tool_call_parser: str = "auto",
    ) -> None:
        self.core = core
        self.tokenizer = tokenizer
        # How this model writes tool calls (`auto`: read off its chat template).
        self.tool_parser = resolve_parser(tool_call_parser, tokenizer.chat_template)
        self.model = model
        self.max_body_bytes = max_body_bytes
        # Default: a text model's (every image part is a 400).
        self.images = images if images is not None else ImageLoader(MediaSettings(), model)
        self.token_text = TokenText(tokenizer)
        self.created = int(time.time())

    # -- endpoints -------------------------------------------------------------------

    async def chat(self, request: Request) -> Response | SSEResponse:
        endpoint = "chat"
        record = access_record(request)
        try:
            body = await read_body(request, self.max_body_bytes)
            req: ChatCompletionRequest = await _off_loop(len(body), parse_body, ChatCompletionRequest, body)
            model = self._check_model(req.model)
            tools = tool_request(req)
            params = chat_sampling_params(req, tools, self.tool_parser.call_format)
            self._check_vocab(req.logit_bias, req.allowed_token_ids)
            explicit_max = (
                req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            )
            # A prompt to be truncated may be longer than the window: no early check then.
            window = self._known_max_model_len(model) if req.truncate_prompt_tokens is None else None
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
                req.continue_final_message,
                template_kwargs(req.chat_template_kwargs, req.documents),
                tools.template_tools if tools is not None else None,
            )
            prompt = truncate_prompt(prompt, req.truncate_prompt_tokens)
            check_context_length(len(prompt.token_ids), explicit_max, self._max_model_len(model), "messages")
            gen = Generation(self.core, f"chatcmpl-{uuid.uuid4().hex}", model, [prompt], params)
            await gen.start()
        except APIError as exc:
            return self._error(endpoint, exc)
        response_id = f"chatcmpl-{req.request_id}" if req.request_id else gen.request_id
        self._track(record, response_id, gen)
        token_text = TokenIdText(self.tokenizer) if req.return_tokens_as_token_ids else self.token_text
        echo_text = last_assistant_text(req.messages) if req.echo else ""
        parsing = None  # tool_choice "none" (or no tools): nothing is read as a call
        if tools is not None and tools.parses:
            parsing = ToolParsing(self.tool_parser, tools.max_calls)
        if req.stream:
            usage = StreamUsage(req.stream_options, len(prompt.token_ids))
            events = chat_chunks(
                gen, response_id, token_text, usage, self._on_end(endpoint, record), echo_text, parsing
            )
            return SSEResponse(events)
        return await self._complete(
            endpoint,
            request,
            gen,
            chat_completion(gen, response_id, token_text, echo_text, req.prompt_logprobs, parsing),
            record,
        )

    async def completions(self, request: Request) -> Response | SSEResponse:
        endpoint = "completions"
        record = access_record(request)
        try:
            body = await read_body(request, self.max_body_bytes)
            req: CompletionRequest = await _off_loop(len(body), parse_body, CompletionRequest, body)
            model = self._check_model(req.model)
            params = completion_sampling_params(req)
            self._check_vocab(req.logit_bias, req.allowed_token_ids)
            window = self._known_max_model_len(model) if req.truncate_prompt_tokens is None else None
            prompts = await _off_loop(
                len(body),
                completion_prompts,
                self.tokenizer,
                req.prompt,
                window,
                req.max_tokens,
                req.add_special_tokens,
            )
            prompts = [truncate_prompt(p, req.truncate_prompt_tokens) for p in prompts]
            max_len = self._max_model_len(model)
            for p in prompts:
                # echo with max_tokens 0 runs one token, which must fit too.
                explicit_max = params.max_tokens if req.max_tokens is not None else None
                check_context_length(len(p.token_ids), explicit_max, max_len, "prompt")
            gen = Generation(self.core, f"cmpl-{uuid.uuid4().hex}", model, prompts, params)
            await gen.start()
        except APIError as exc:
            return self._error(endpoint, exc)
        response_id = f"cmpl-{req.request_id}" if req.request_id else gen.request_id
        view = CompletionView(
            n=req.n,
            logprobs=req.logprobs,
            echo=req.echo,
            echo_only=echo_only(req),
            prompt_logprobs=req.prompt_logprobs,
        )
        self._track(record, response_id, gen, view.echo_only)
        token_text = TokenIdText(self.tokenizer) if req.return_tokens_as_token_ids else self.token_text
        if req.stream:
            usage = StreamUsage(req.stream_options, sum(len(p.token_ids) for p in prompts))
            events = completion_chunks(
                gen, response_id, token_text, self.tokenizer, view, usage, self._on_end(endpoint, record)
            )
            return SSEResponse(events)
        return await self._complete(
            endpoint, request, gen, completion(gen, response_id, token_text, self.tokenizer, view), record
        )

    def models(self) -> Response:
        return json_response(ModelList(data=[self._card()]))

    def retrieve_model(self, model_id: str) -> Response:
        """GET /v1/models/{id}: the served model's card, or 404 as OpenAI answers."""
        if model_id != self.model:
            return error_response(errors.model_not_found(model_id))
        return json_response(self._card())

    def version(self) -> Response:
        return json_response({"version": __version__})

    async def tokenize(self, request: Request) -> Response:
        """vLLM's POST /tokenize: a prompt, or messages rendered as chat does."""
        try:
            body = await read_body(request, self.max_body_bytes)
            raw = await _off_loop(len(body), _json_object, body)
            if "messages" in raw:
                chat_req: TokenizeChatRequest = await _off_loop(len(body), parse_body, TokenizeChatRequest, body)
                self._check_model(chat_req.model)
                kwargs = check_tokenize_chat(chat_req)
                _, tools = check_tools(chat_req.tools)
                images = await self.images.load(chat_req.messages)
                prompt = await _off_loop(
                    len(body),
                    chat_prompt,
                    self.tokenizer,
                    chat_req.messages,
                    chat_req.add_generation_prompt,
                    None,
                    None,
                    images,
                    self.images.family,
                    chat_req.continue_final_message,
                    kwargs,
                    tools,
                )
                tokens, strs = prompt.token_ids, chat_req.return_token_strs
            else:
                text_req: TokenizeCompletionRequest = await _off_loop(
                    len(body), parse_body, TokenizeCompletionRequest, body
                )
                self._check_model(text_req.model)
                tokens = await _off_loop(
                    len(body), self.tokenizer.encode, text_req.prompt, text_req.add_special_tokens
                )
                strs = text_req.return_token_strs
        except APIError as exc:
            return error_response(exc)
        window = self._known_max_model_len(self.model)
        return json_response(tokenize_response(self.tokenizer, tokens, window, strs))

    async def detokenize(self, request: Request) -> Response:
        """vLLM's POST /detokenize: token ids back to text."""
        try:
            body = await read_body(request, self.max_body_bytes)
            req: DetokenizeRequest = await _off_loop(len(body), parse_body, DetokenizeRequest, body)
            self._check_model(req.model)
            return json_response(await _off_loop(len(body), detokenize, self.tokenizer, req))
        except APIError as exc:
            return error_response(exc)

    # -- helpers ---------------------------------------------------------------------

    def _card(self) -> ModelCard:
        return ModelCard(id=self.model, created=self.created, max_model_len=self._known_max_model_len(self.model))

    def _check_vocab(self, logit_bias: dict[str, float] | None, allowed: list[int] | None) -> None:
        """Token ids the request names must be the model's (SamplingParams checked their
        form); the engine checks them against its own vocabulary too."""
        vocab = self.tokenizer.vocab_size
        for param, ids in (("logit_bias", [int(k) for k in logit_bias or ()]), ("allowed_token_ids", allowed or [])):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise errors.bad_request(f"{param}: token id {bad} is outside the vocabulary [0, {vocab}).", param)

    def _track(self, record: AccessRecord | None, response_id: str, gen: Generation, echo_only: bool = False) -> None:
        if record is not None:
            record.response_id, record.generation, record.echo_only = response_id, gen, echo_only

    def _on_end(self, endpoint: str, record: AccessRecord | None) -> Callable[[int], None]:
        """What a stream calls with the status it ended with."""

        def end(status: int) -> None:
            self._count(endpoint, status)
            if record is not None:
                record.status = status

        return end

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
        self,
        endpoint: str,
        request: Request,
        gen: Generation,
        work: Awaitable[Any],
        record: AccessRecord | None = None,
    ) -> Response:
        """Run a non-streaming request; a client that disconnects cancels it."""
        try:
            result = await _unless_disconnected(request, work)
        except ClientDisconnected:
            gen.close()
            self._count(endpoint, CLIENT_CLOSED)
            if record is not None:
                record.status = CLIENT_CLOSED
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


def _json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, to tell /tokenize's two shapes apart (400 otherwise)."""
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise errors.bad_request(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise errors.bad_request("The request body must be a JSON object.")
    return value


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
