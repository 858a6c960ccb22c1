"""/v1/chat/completions bodies: the whole response, or its SSE chunks.

vLLM's extensions: with `echo` and a last message of the assistant's, each choice's
content starts with that message's text; `prompt_logprobs` go at the top level.
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
    ChatMessageOut,
    usage_info,
)
from rtpllm.api.sse import DONE, sse_error, sse_event
from rtpllm.api.stream_usage import StreamUsage
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
    return ChatCompletion(
        id=response_id,
        created=int(time.time()),
        model=gen.model,
        choices=[
            ChatChoice(
                index=i,
                message=ChatMessageOut(role="assistant", content=echo_text + "".join(c.text)),
                logprobs=token_text.chat(c.logprobs, top_k) if top_k is not None else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for i, c in enumerate(choices)
        ],
        usage=usage_info(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
        system_fingerprint=gen.fingerprint,
        prompt_logprobs=token_text.prompt(prompt_positions, prompt_logprobs) if prompt_logprobs is not None else UNSET,
    )


async def chat_chunks(
    gen: Generation,
    response_id: str,
    token_text: TokenText,
    usage: StreamUsage,
    on_end: Callable[[int], None],
    echo_text: str = "",
) -> AsyncIterator[bytes]:
    """SSE events of a streamed chat completion: a role chunk per choice (carrying the
    echoed text, if any), content chunks, a finish chunk per choice, an optional usage
    chunk, `[DONE]`. A failure becomes an error event (and no `[DONE]`). `on_end` gets
    the status the stream ended with."""
    created = int(time.time())
    top_k = gen.params.logprobs
    fingerprint = gen.fingerprint

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
