"""/v1/completions bodies: the whole response, or its SSE chunks.

Choices are numbered prompt_index * n + sample_index (several prompts may be batched).
With `echo` the prompt text leads each choice; with `echo` and `logprobs` the prompt's
logprobs lead the choice's logprobs (the first prompt token has none, as in OpenAI).
With `echo` and `max_tokens: 0` the choice is the prompt alone: the engine runs one
token (it computes the prompt's logprobs on the way) which is dropped. vLLM's
`prompt_logprobs` go on each choice, for its prompt. `best_of` (rtpllm.api.best_of)
picks the n returned from more candidates.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from msgspec import UNSET

from rtpllm.api.best_of import best_of
from rtpllm.api.errors import CLIENT_CLOSED, APIError
from rtpllm.api.generation import Generation, failed
from rtpllm.api.logprobs import CompletionLogprobsBuilder, TokenText
from rtpllm.api.responses import Completion, CompletionChoice, CompletionLogprobs, usage_info
from rtpllm.api.sse import DONE, sse_error, sse_event
from rtpllm.api.stream_usage import StreamUsage
from rtpllm.protocol.messages import PositionLogprobs, TokenDelta
from rtpllm.tokenizer import Tokenizer


@dataclass(frozen=True)
class CompletionView:
    """What the client sees, where it differs from what the engine runs: `n` choices
    per prompt (best_of runs more), `logprobs` (best_of asks the engine for some to rank
    by), `echo_only` (max_tokens 0: the engine's one token is dropped) and vLLM's
    `prompt_logprobs`."""

    n: int
    logprobs: int | None
    echo: bool = False
    echo_only: bool = False
    prompt_logprobs: int | None = None


class _PromptEcho:
    """The echo of one prompt: its text, and its logprobs once they all arrived."""

    def __init__(self, token_ids: list[int], text: str, want_logprobs: bool) -> None:
        self.token_ids = token_ids
        self.text = text
        self.want_logprobs = want_logprobs
        self.positions: list[PositionLogprobs | None] = []
        self.emitted = False

    def add(self, delta: TokenDelta) -> None:
        if delta.prompt_logprobs:
            self.positions.extend(delta.prompt_logprobs)

    @property
    def ready(self) -> bool:
        return not self.want_logprobs or len(self.positions) >= len(self.token_ids)


class _Choice:
    def __init__(self, token_text: TokenText, top_k: int | None) -> None:
        self.text: list[str] = []
        self.builder = CompletionLogprobsBuilder(token_text, top_k or 0) if top_k is not None else None
        self.logprobs: CompletionLogprobs | None = (
            CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]) if top_k is not None else None
        )
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def echo(self, echo: _PromptEcho) -> CompletionLogprobs | None:
        """Record the echoed prompt; returns its logprobs (if asked for)."""
        self.text.append(echo.text)
        if self.builder is None:
            return None
        if echo.want_logprobs:
            part = self.builder.build(echo.positions, echo.token_ids[0])
        else:
            part = self.builder.build([])
        self.builder.offset = len(echo.text)  # offsets continue after the prompt text
        _extend(self.logprobs, part)
        return part

    def add(self, text: str, positions: list[PositionLogprobs] | None) -> CompletionLogprobs | None:
        self.text.append(text)
        if self.builder is None:
            return None
        part = self.builder.build(positions or [])
        _extend(self.logprobs, part)
        return part


def _extend(acc: CompletionLogprobs | None, part: CompletionLogprobs) -> None:
    if acc is not None:
        acc.tokens.extend(part.tokens)
        acc.token_logprobs.extend(part.token_logprobs)
        acc.top_logprobs.extend(part.top_logprobs)
        acc.text_offset.extend(part.text_offset)


def _echoes(gen: Generation, tokenizer: Tokenizer, echo: bool) -> list[_PromptEcho] | None:
    if not echo:
        return None
    want = gen.params.prompt_logprobs is not None
    return [
        _PromptEcho(p.token_ids, p.text if p.text is not None else tokenizer.decode(p.token_ids, skip_special_tokens=False), want)
        for p in gen.prompts
    ]


async def completion(
    gen: Generation, response_id: str, token_text: TokenText, tokenizer: Tokenizer, view: CompletionView
) -> Completion:
    """Collect every delta into one Completion (raises APIError on failure)."""
    n = view.n
    choices = [_Choice(token_text, view.logprobs) for _ in range(n * len(gen.prompts))]
    echoes = _echoes(gen, tokenizer, view.echo)
    prompt_positions: list[list[PositionLogprobs | None]] = [[] for _ in gen.prompts]
    generated: list[list[tuple[str, list[PositionLogprobs] | None]]] = [[] for _ in choices]
    deltas = best_of(gen.deltas(), n) if gen.params.n > n else gen.deltas()
    async for p, delta in deltas:
        if echoes is not None:
            echoes[p].add(delta)
        if delta.prompt_logprobs:
            prompt_positions[p].extend(delta.prompt_logprobs)
        for c in delta.choices:
            i = p * n + c.index
            if not view.echo_only:
                generated[i].append((c.text, c.logprobs))
            if c.finish_reason is not None:
                choices[i].finish_reason, choices[i].stop_reason = c.finish_reason, c.stop_reason
                if view.echo_only:
                    choices[i].finish_reason, choices[i].stop_reason = "length", None
    for i, choice in enumerate(choices):
        if echoes is not None:
            choice.echo(echoes[i // n])
        for text, positions in generated[i]:
            choice.add(text, positions)
    u = gen.total_usage()
    return Completion(
        id=response_id,
        created=int(time.time()),
        model=gen.model,
        choices=[
            CompletionChoice(
                index=i,
                text="".join(c.text),
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                prompt_logprobs=(
                    token_text.prompt(prompt_positions[i // n], view.prompt_logprobs)
                    if view.prompt_logprobs is not None
                    else UNSET
                ),
            )
            for i, c in enumerate(choices)
        ],
        usage=usage_info(u.prompt_tokens, 0 if view.echo_only else u.completion_tokens, u.cached_tokens),
        system_fingerprint=gen.fingerprint,
    )


async def completion_chunks(
    gen: Generation,
    response_id: str,
    token_text: TokenText,
    tokenizer: Tokenizer,
    view: CompletionView,
    usage: StreamUsage,
    on_end: Callable[[int], None],
) -> AsyncIterator[bytes]:
    """SSE events of a streamed completion; see chat_chunks for the error contract.
    (best_of and prompt_logprobs are refused with stream before this runs.)"""
    created = int(time.time())
    n = view.n
    choices = [_Choice(token_text, view.logprobs) for _ in range(n * len(gen.prompts))]
    echoes = _echoes(gen, tokenizer, view.echo)
    fingerprint = gen.fingerprint

    def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, finish: str | None, stop: object = UNSET) -> bytes:
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish, stop_reason=stop)  # type: ignore[arg-type]
        return sse_event(
            Completion(
                id=response_id,
                created=created,
                model=gen.model,
                choices=[choice],
                usage=usage.chunk(),
                system_fingerprint=fingerprint,
            )
        )

    def echo_chunks(p: int) -> list[bytes]:
        assert echoes is not None
        echoes[p].emitted = True
        return [chunk(p * n + j, echoes[p].text, choices[p * n + j].echo(echoes[p]), None) for j in range(n)]

    status = 200
    try:
        if echoes is not None:
            for p, e in enumerate(echoes):
                if e.ready:
                    for event in echo_chunks(p):
                        yield event
        async for batch in gen.batches():
            events: list[bytes] = []
            for p, delta in batch:
                if echoes is not None and not echoes[p].emitted:
                    echoes[p].add(delta)
                    if echoes[p].ready or delta.finished:
                        events.extend(echo_chunks(p))
                for c in delta.choices:
                    i = p * n + c.index
                    if view.echo_only:  # the prompt was the answer; the one token run is not
                        if c.finish_reason is not None:
                            events.append(chunk(i, "", None, "length", None))
                        continue
                    usage.add(len(c.token_ids))
                    if not c.text and not c.logprobs and c.finish_reason is None:
                        continue
                    logprobs = choices[i].add(c.text, c.logprobs)
                    stop = c.stop_reason if c.finish_reason is not None else UNSET
                    events.append(chunk(i, c.text, logprobs, c.finish_reason, stop))
            if events:
                yield b"".join(events)  # one write for all the tokens that were waiting
        final = usage.final(gen.total_usage(), 0 if view.echo_only else None)
        if final is not None:
            yield sse_event(
                Completion(
                    id=response_id, created=created, model=gen.model, choices=[], usage=final, system_fingerprint=fingerprint
                )
            )
        yield DONE
    except Exception as exc:
        error: APIError = failed(exc)
        status = error.status
        yield sse_error(error)
    except BaseException:  # GeneratorExit / CancelledError: the client went away
        status = CLIENT_CLOSED
        raise
    finally:
        gen.close()
        on_end(status)
