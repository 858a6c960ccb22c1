"""One API request's life on the bus, shared by chat and completions: admission, routing
each prompt to an instance, merged deltas under a deadline, metrics, and cleanup that
cancels whatever is still running (client gone, error, deadline)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from rtpllm.api import errors
from rtpllm.api.errors import APIError
from rtpllm.api.fingerprint import system_fingerprint
from rtpllm.api.prompts import Prompt
from rtpllm.protocol.convert import spec_from_params
from rtpllm.protocol.messages import ErrorCode, ErrorInfo, GenerateRequest, TokenDelta, Usage
from rtpllm.sampling_params import SamplingParams
from rtpllm.serving.admission import AdmissionController, Overloaded
from rtpllm.serving.dispatcher import (
    Dispatcher,
    InstancesBusy,
    NoInstanceError,
    RequestStream,
    SubmitRejected,
)
from rtpllm.serving.metrics import GatewayMetrics


@dataclass
class GatewayCore:
    """What request handling needs from the gateway, built once at startup."""

    dispatcher: Dispatcher
    admission: AdmissionController
    metrics: GatewayMetrics
    request_timeout_s: float


class Generation:
    """Runs `prompts` x `params` for one API request.

    `await start()` admits and submits (raising APIError with the right status before
    any byte is sent); admission counts sequences, `len(prompts) x params.n`, since
    that is what occupies the engines (and their KV), `deltas()` yields `(prompt_index, TokenDelta)` until every prompt
    finished, raising APIError if one fails; `close()` (idempotent, synchronous) cancels
    what still runs and gives the admission slot back.
    """

    def __init__(
        self, core: GatewayCore, request_id: str, model: str, prompts: list[Prompt], params: SamplingParams
    ) -> None:
        self._core = core
        self.request_id = request_id
        self.model = model
        self.prompts = prompts
        self.params = params
        self.arrival = time.monotonic()
        self._deadline = time.time() + core.request_timeout_s
        self._loop_deadline = asyncio.get_running_loop().time() + core.request_timeout_s
        self.streams: list[RequestStream] = []
        self.seqs = len(prompts) * params.n
        self._admitted = False
        self._pumps: list[asyncio.Task[None]] = []
        self.usage: list[Usage | None] = [None] * len(prompts)
        self._first_token_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Until started: the gateway's own; then the serving instance's (its weights).
        self.fingerprint = system_fingerprint(b"", model)

    async def start(self) -> None:
        admission = self._core.admission
        if self.seqs > admission.max_running:
            # It could never be admitted: say so now rather than queueing it forever.
            raise errors.bad_request(
                f"This request asks for {self.seqs} sequences ({len(self.prompts)} prompt(s) x n={self.params.n}); "
                f"this server runs at most {admission.max_running} at once.",
                "n",
            )
        try:
            async with asyncio.timeout_at(self._loop_deadline):
                await admission.acquire(self.seqs)
                self._admitted = True
                spec = spec_from_params(self.params)
                for i, prompt in enumerate(self.prompts):
                    rid = self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{i}"
                    req = GenerateRequest(
                        request_id=rid,
                        model=self.model,
                        prompt_token_ids=prompt.token_ids,
                        sampling=spec,
                        reply_to="",  # the dispatcher fills in its own
                        gateway_id="",
                        deadline=self._deadline,
                        images=prompt.images,
                    )
                    self.streams.append(await self._core.dispatcher.submit(req))
            instance = self._core.dispatcher.registry.get(self.streams[0].instance_id)
            if instance is not None:
                self.fingerprint = system_fingerprint(instance.heartbeat.kv_namespace, self.model)
            # Past the deadline every stream ends with an error delta (and its instance
            # is told to stop). A timer rather than a timeout around `yield`s: the
            # consumer runs between them, and a cancellation must not land there.
            self._timer = asyncio.get_running_loop().call_at(self._loop_deadline, self._expire)
        except Overloaded as exc:
            self.close()
            raise errors.overloaded(exc.retry_after_s) from None
        except TimeoutError:
            self.close()
            raise errors.deadline_exceeded("The request was not started before its deadline.") from None
        except InstancesBusy as exc:
            self.close()
            raise errors.overloaded(
                exc.retry_after_s or admission.retry_after_s, f"Every worker is at capacity ({exc}). Retry later."
            ) from None
        except NoInstanceError as exc:
            self.close()
            raise errors.unavailable(
                f"No worker is available for model {self.model!r}: {exc}",
                retry_after_s=admission.retry_after_s,
            ) from None
        except SubmitRejected as exc:
            self.close()
            raise errors.from_error_info(exc.error) from None
        except BaseException:
            self.close()
            raise

    async def deltas(self) -> AsyncIterator[tuple[int, TokenDelta]]:
        """`(prompt_index, delta)` one at a time (see `batches`)."""
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self) -> AsyncIterator[list[tuple[int, TokenDelta]]]:
        """Deltas of every prompt as they arrive, in batches of those already waiting
        (streamed responses write a batch at once). Raises APIError if a prompt fails."""
        metrics = self._core.metrics
        last_token_at: dict[int, float] = {}
        finish_reasons: list[str] = []
        try:
            async for batch in self._merged():
                now = time.monotonic()
                for index, delta in batch:
                    if delta.error is not None:
                        raise errors.from_error_info(delta.error)
                    ntokens = sum(len(c.token_ids) for c in delta.choices)
                    if ntokens:
                        if self._first_token_at is None:
                            self._first_token_at = now
                            metrics.ttft.observe(now - self.arrival)
                        prev = last_token_at.get(index)
                        if prev is not None:
                            gap = (now - prev) / ntokens
                            for _ in range(ntokens):
                                metrics.itl.observe(gap)
                        last_token_at[index] = now
                        metrics.generation_tokens.inc(ntokens)
                    if delta.usage is not None:
                        self.usage[index] = delta.usage
                        metrics.prompt_tokens.inc(delta.usage.prompt_tokens)
                        metrics.cached_tokens.inc(delta.usage.cached_tokens)
                    finish_reasons.extend(c.finish_reason for c in delta.choices if c.finish_reason is not None)
                yield batch
        finally:
            self.close()
        metrics.e2e.observe(time.monotonic() - self.arrival)
        for reason in finish_reasons:
            metrics.finished(reason)

    @property
    def ttft_s(self) -> float | None:
        """Seconds from arrival to the first token, once there was one."""
        return None if self._first_token_at is None else self._first_token_at - self.arrival

    async def _merged(self) -> AsyncIterator[list[tuple[int, TokenDelta]]]:
        if len(self.streams) == 1:
            async for batch in self.streams[0].batches():
                yield [(0, delta) for delta in batch]
            return
        queue: asyncio.Queue[tuple[int, TokenDelta]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            async for delta in stream:
                queue.put_nowait((index, delta))

        self._pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        remaining = len(self.streams)
        while remaining:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            remaining -= sum(1 for _, delta in batch if delta.finished)
            yield batch

    def total_usage(self) -> Usage:
        prompt = completion = cached = 0
        for usage in self.usage:
            if usage is not None:
                prompt += usage.prompt_tokens
                completion += usage.completion_tokens
                cached += usage.cached_tokens
        return Usage(prompt, completion, cached)

    def _expire(self) -> None:
        error = ErrorInfo(
            ErrorCode.DEADLINE_EXCEEDED,
            f"The request did not finish within {self._core.request_timeout_s:g} s.",
        )
        for stream in self.streams:
            if not stream.finished:
                self._core.dispatcher.fail(stream, error)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in self._pumps:
            task.cancel()
        for stream in self.streams:
            if not stream.remote_finished:
                self._core.dispatcher.cancel(stream, ErrorCode.CANCELLED)
        if self._admitted:
            self._admitted = False
            with contextlib.suppress(Exception):
                self._core.admission.release(self.seqs)


def failed(error: BaseException) -> APIError:
    """The APIError for anything raised while serving (unexpected ones become a 500)."""
    if isinstance(error, APIError):
        return error
    return errors.internal(f"internal error: {type(error).__name__}: {error}")
