"""A zero-compute engine: emits tokens on a fixed cadence without a model.

It measures what the serving path (engine server, NATS, gateway, HTTP) adds on top of an
engine (bench/serving_overhead.py), and it lets bus tests run in-process without torch.
Like a continuous-batching engine, all running requests advance together, one token per
step; a step takes `step_interval_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from rtpllm.engine.stats import EngineStats
from rtpllm.outputs import CompletionOutput, RequestOutput
from rtpllm.sampling_params import SamplingParams
from rtpllm.serving.engine_info import EngineInfo


class SyntheticEngine:
    """Token `i` of every sample is id `first_token + i % 26`, text one letter a-z (or,
    with `stamp_text`, the wall-clock time it was emitted, so a client can measure the
    latency the serving path adds to each token)."""

    def __init__(
        self, step_interval_s: float = 0.0, info: EngineInfo | None = None, first_token: int = 97, stamp_text: bool = False
    ) -> None:
        self.step_interval_s = step_interval_s
        self.stamp_text = stamp_text
        self.info = info or EngineInfo(
            model="synthetic", max_model_len=1 << 16, vocab_size=1 << 16, max_num_seqs=1 << 16, block_size=16, kv_namespace=b""
        )
        self._first = first_token
        self._running = 0
        self._generated = 0
        self._prompt = 0
        self._step = asyncio.Event()
        self._clock: asyncio.Task[None] | None = None
        self._alive = True

    @property
    def is_alive(self) -> bool:
        return self._alive

    def stats(self) -> EngineStats:
        return EngineStats(num_running=self._running, prompt_tokens=self._prompt, generation_tokens=self._generated)

    async def _tick(self) -> None:
        """Wait for the next shared step (all requests advance on the same beat)."""
        if self.step_interval_s <= 0:
            await asyncio.sleep(0)
            return
        if self._clock is None or self._clock.done():
            self._clock = asyncio.create_task(self._run_clock())
        await self._step.wait()

    async def _run_clock(self) -> None:
        while self._running:
            await asyncio.sleep(self.step_interval_s)
            self._step.set()
            self._step = asyncio.Event()

    async def generate(self, request_id: str, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if not prompt:
            raise ValueError("prompt is empty")
        max_tokens = params.max_tokens or (self.info.max_model_len - len(prompt))
        self._running += 1
        self._prompt += len(prompt)
        try:
            for i in range(max_tokens):
                await self._tick()
                last = i == max_tokens - 1
                token = self._first + i % 26
                text = f"{time.time():.6f} " if self.stamp_text else chr(token)
                self._generated += params.n
                yield RequestOutput(
                    request_id=request_id,
                    prompt_token_ids=list(prompt),
                    outputs=[
                        CompletionOutput(index=j, text=text, token_ids=[token], finish_reason="length" if last else None)
                        for j in range(params.n)
                    ],
                    finished=last,
                )
        finally:
            self._running -= 1

    async def shutdown(self) -> None:
        self._alive = False
        if self._clock is not None:
            self._clock.cancel()
