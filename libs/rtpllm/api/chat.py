"""/v1/chat/completions bodies: the whole response, or its SSE chunks.

vLLM's extensions: with `echo` and a last message of the assistant's, each choice's
content starts with that message's text; `prompt_logprobs` go at the top level.

With tools (`tools`: a ToolParsing), each choice's text is read for tool calls
(rtpllm.api.tool_output): the message gets `tool_calls`, the stream their deltas, and
a choice that called tools and stopped on its own finishes with "tool_calls".
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from msgspec import UNSET

from rtpllm.api.errors import CLIENT_CLOSED, APIError
from rtpllm.api.generation import Generation, failed
from rtpllm.api.logprobs import TokenText
from rtpllm.api.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    usage_info,
)
from rtpllm.api.sse import DONE, sse_error, sse_event
from rtpllm.api.stream_usage import StreamUsage
from rtpllm.api.tool_output import ToolOutput, ToolParsing
from rtpllm.protocol.messages import ChoiceDelta, PositionLogprobs


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text.append(delta.text)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason


async def chat_completion(
    gen: Generation,
    response_id: str,
    token_text: TokenText,
    echo_text: str = "",
    prompt_logprobs: int | None = None,
    tools: ToolParsing | None = None,
) -> ChatCompletion:
    """Collect every delta into one ChatCompletion (raises APIError on failure)."""
    choices = [_Choice() for _ in range(gen.params.n)]
    prompt_positions: list[PositionLogprobs | None] = []
    async for _, delta in gen.deltas():
        if delta.prompt_logprobs:
            prompt_positions.extend(delta.prompt_logprobs)
        for c in delta.choices:
            choices[c.index].add(c)
    top_k = gen.params.logprobs
    usage = gen.total_usage()
    messages = [_message(c, echo_text, tools) for c in choices]
    return ChatCompletion(
        id=response_id,
        created=int(time.time()),
        model=gen.model,
        choices=[
            ChatChoice(
                index=i,
                message=message,
                logprobs=token_text.chat(c.logprobs, top_k) if top_k is not None else None,
                finish_reason=finish_reason,
                stop_reason=c.stop_reason,
            )
            for i, (c, (message, finish_reason)) in enumerate(zip(choices, messages, strict=True))
        ],
        usage=usage_info(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
        system_fingerprint=gen.fingerprint,
        prompt_logprobs=token_text.prompt(prompt_positions, prompt_logprobs) if prompt_logprobs is not None else UNSET,
    )


def _message(choice: _Choice, echo_text: str, tools: ToolParsing | None) -> tuple[ChatMessageOut, str | None]:
    """A finished choice's message and finish reason."""
    text = "".join(choice.text)
    if tools is None:
        return ChatMessageOut(role="assistant", content=echo_text + text), choice.finish_reason
    output = tools.output()
    output.feed(text)
    output.finish()
    content, calls = output.message(echo_text)
    reason = output.finish_reason(choice.finish_reason) if choice.finish_reason is not None else None
    return ChatMessageOut(role="assistant", content=content, tool_calls=calls if calls else UNSET), reason


async def chat_chunks(
    gen: Generation,
    response_id: str,
    token_text: TokenText,
    usage: StreamUsage,
    on_end: Callable[[int], None],
    echo_text: str = "",
    tools: ToolParsing | None = None,
) -> AsyncIterator[bytes]:
    """SSE events of a streamed chat completion: a role chunk per choice (carrying the
    echoed text, if any), content chunks, a finish chunk per choice, an optional usage
    chunk, `[DONE]`. A failure becomes an error event (and no `[DONE]`). `on_end` gets
    the status the stream ended with. With `tools`, text goes through each choice's
    tool-call parser, and the finish comes in a chunk of its own, as OpenAI sends it."""
    created = int(time.time())
    top_k = gen.params.logprobs
    fingerprint = gen.fingerprint
    outputs = [tools.output() for _ in range(gen.params.n)] if tools is not None else None

    def chunk(choice: ChatChunkChoice) -> bytes:
        return sse_event(
            ChatCompletionChunk(
                id=response_id,
                created=created,
                model=gen.model,
                choices=[choice],
                usage=usage.chunk(),
                system_fingerprint=fingerprint,
            )
        )

    status = 200
    try:
        for i in range(gen.params.n):
            yield chunk(
                ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=echo_text), logprobs=None, finish_reason=None)
            )
        async for batch in gen.batches():
            events = []
            for _, delta in batch:
                for c in delta.choices:
                    usage.add(len(c.token_ids))
                    if not c.text and not c.logprobs and c.finish_reason is None:
                        continue
                    logprobs = token_text.chat(c.logprobs, top_k) if top_k is not None and c.logprobs else None
                    if outputs is not None:
                        events.extend(map(chunk, _tool_chunks(outputs[c.index], c, logprobs)))
                        continue
                    events.append(
                        chunk(
                            ChatChunkChoice(
                                index=c.index,
                                delta=ChatDelta(content=c.text) if (c.text or logprobs) else ChatDelta(),
                                logprobs=logprobs,
                                finish_reason=c.finish_reason,
                                stop_reason=c.stop_reason if c.finish_reason is not None else UNSET,
                            )
                        )
                    )
            if events:
                yield b"".join(events)  # one write for all the tokens that were waiting
        final = usage.final(gen.total_usage())
        if final is not None:
            yield sse_event(
                ChatCompletionChunk(
                    id=response_id, created=created, model=gen.model, choices=[], usage=final, system_fingerprint=fingerprint
                )
            )
        yield DONE
    except Exception as exc:  # APIError or a bug: the client gets an error event either way
        error: APIError = failed(exc)
        status = error.status
        yield sse_error(error)
    except BaseException:  # GeneratorExit / CancelledError: the client went away
        status = CLIENT_CLOSED
        raise
    finally:
        gen.close()
        on_end(status)


def _tool_chunks(
    output: ToolOutput, delta: ChoiceDelta, logprobs: ChatLogprobs | None
) -> list[ChatChunkChoice]:
    """A choice's chunks for one engine delta, read for tool calls: the deltas its text
    settles (the logprobs ride on the first, or on an empty delta while text is held
    back), then the finish in a chunk of its own."""
    deltas = output.feed(delta.text)
    if delta.finish_reason is not None:
        deltas += output.finish()
    if not deltas and logprobs is not None:
        deltas = [ChatDelta()]
    chunks = [
        ChatChunkChoice(index=delta.index, delta=d, logprobs=logprobs if k == 0 else None, finish_reason=None)
        for k, d in enumerate(deltas)
    ]
    if delta.finish_reason is not None:
        chunks.append(
            ChatChunkChoice(
                index=delta.index,
                delta=ChatDelta(),
                logprobs=None,
                finish_reason=output.finish_reason(delta.finish_reason),
                stop_reason=delta.stop_reason,
            )
        )
    return chunks
