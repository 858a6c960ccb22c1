"""The asyncio face of the engine, for services: add requests, stream their outputs,
abort them. The synchronous engine runs in one background thread (a forward pass
blocks); requests and aborts reach it through a queue, outputs come back through
per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rtpllm.config import EngineConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.engine.stats import EngineStats
from rtpllm.kvcache.events import CachedKeys, KVEventBatch
from rtpllm.outputs import KVReservation, RequestOutput
from rtpllm.sampling_params import SamplingParams
from rtpllm.transfer.blocks import KVBlocks

if TYPE_CHECKING:
    from rtpllm.multimodal.inputs import MultimodalInputs

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served by this engine any more."""


@dataclass
class _Add:
    request_id: str
    prompt: str | Sequence[int]
    params: SamplingParams
    prefill_only: bool = False
    remote: RemotePrefill | None = None
    multimodal: MultimodalInputs | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run `fn(engine)` on the engine thread (disaggregation hand-offs, KV release)."""

    fn: Callable[[LLMEngine], object]


@dataclass
class RemotePrefill:
    """Ask the engine to reserve blocks for a remote prefill (see LLMEngine.add_request).

    `reserved` is resolved from the engine thread with the KVReservation, or None when
    the request is prefilled here instead (short uncached part, no free blocks, or the
    request was refused)."""

    min_uncached_tokens: int
    reserved: asyncio.Future[KVReservation | None]


_STOP = object()


class AsyncLLMEngine:
    """Streams delta `RequestOutput`s per request; the last one has `finished=True`.

    Every stream ends: normally, by abort, by a per-request error (`output.error`), or
    with EngineDeadError if the engine thread dies.
    """

    def __init__(self, engine: LLMEngine, thread: threading.Thread | None = None) -> None:
        """`thread`: the thread that built `engine` and runs `_run` next (see `create`);
        None starts a thread of its own."""
        self.engine = engine
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput | BaseException]]] = {}
        self._lock = threading.Lock()
        self._stats = engine.stats()
        self._dead: BaseException | None = None
        if thread is None:
            thread = threading.Thread(target=self._run, name="rtpllm-engine", daemon=True)
            thread.start()
        self._thread = thread

    @classmethod
    async def create(
        cls,
        config: EngineConfig,
        on_kv_events: Callable[[KVEventBatch], None] | None = None,
        engine_id: str = "engine-0",
        load_progress: Callable[[int, int], None] | None = None,
    ) -> AsyncLLMEngine:
        """Load the model off the event loop (it takes seconds) on the thread that then
        runs the engine. `load_progress(bytes_done, bytes_total)` is called from the
        loader's thread.

        One thread for both, because on CPU every thread that runs torch ops gets its own
        OpenMP team, and once the teams hold more threads than there are cores, libgomp
        stops spinning between parallel regions: each small op then waits for sleeping
        workers to wake. Loading on an executor thread and stepping on another made the
        engine ~1.6x slower on 2 cores (docs/benchmarks.md, Serving tax)."""
        loop = asyncio.get_running_loop()
        built: asyncio.Future[AsyncLLMEngine] = loop.create_future()

        def run() -> None:
            try:
                engine = LLMEngine(config, on_kv_events, engine_id, load_progress)
            except BaseException as exc:  # noqa: BLE001 - the awaiting coroutine raises it
                loop.call_soon_threadsafe(_fail, built, exc)
                return
            if built.cancelled():  # the caller stopped waiting (shutdown during load)
                engine.close()
                return
            this = cls(engine, threading.current_thread())
            loop.call_soon_threadsafe(_resolve, built, this)
            this._run()

        threading.Thread(target=run, name="rtpllm-engine", daemon=True).start()
        return await built

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_alive(self) -> bool:
        """False once the engine thread died, or a tensor-parallel rank did (noticed
        within a step, or by rank 0's watch while idle)."""
        tp = self.engine.tp
        return self._dead is None and self._thread.is_alive() and (tp is None or tp.error is None)

    def stats(self) -> EngineStats:
        """Stats as of the last step (safe to call from any thread)."""
        return self._stats

    async def generate(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        prefill_only: bool = False,
        remote: RemotePrefill | None = None,
        multimodal: MultimodalInputs | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its delta outputs. Leaving the loop early (or the
        task being cancelled) aborts the request and frees its KV blocks.

        `prefill_only` and `remote` are the two sides of disaggregation (see
        LLMEngine.add_request); a prefill-only request's held KV is freed by
        `release_kv`, not by the end of its stream. `multimodal`: the prompt's images
        (LLMEngine.add_request)."""
        if self._dead is not None or not self._thread.is_alive():
            raise EngineDeadError(f"engine is not running: {self._dead or 'shut down'}")
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(_Add(request_id, prompt, params or SamplingParams(), prefill_only, remote, multimodal))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def complete_remote_prefill(
        self, request_id: str, first_token: int, logprobs: tuple | None = None, num_cached_tokens: int = 0
    ) -> None:
        self._commands.put(_Call(lambda e: e.complete_remote_prefill(request_id, first_token, logprobs, num_cached_tokens)))

    def fail_remote_prefill(self, request_id: str, first_token: int | None = None, logprobs: tuple | None = None) -> None:
        self._commands.put(_Call(lambda e: e.fail_remote_prefill(request_id, first_token, logprobs)))

    async def cached_block_keys(self) -> CachedKeys:
        """The cached block keys (pool and host tier) and the last KV event seq, read on
        the engine thread."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CachedKeys] = loop.create_future()

        def read(engine: LLMEngine) -> None:
            result = engine.cached_block_keys()
            loop.call_soon_threadsafe(_resolve, future, result)

        self._commands.put(_Call(read))
        return await future

    def release_kv(self, request_id: str) -> None:
        self._commands.put(_Call(lambda e: e.release_kv(request_id)))

    @property
    def kv_blocks(self) -> KVBlocks:
        """The engine's KV pool as the data plane moves it (LLMEngine.kv_blocks: whole
        blocks, the ranks' heads through rank 0 with tensor parallelism)."""
        return self.engine.kv_blocks()

    async def shutdown(self) -> None:
        """Stop the engine thread; streams still open end with EngineDeadError."""
        self._commands.put(_STOP)
        await asyncio.to_thread(self._thread.join, 30)
        self._end_streams(EngineDeadError("engine shut down"))
        await asyncio.to_thread(self.engine.close)

    # -- engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            if torch.device(self.engine.device).index is not None:
                torch.cuda.set_device(torch.device(self.engine.device))  # per thread, as Triton needs
            while True:
                block = not self.engine.has_unfinished_requests()
                if not self._apply_commands(block):
                    return
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
                    self._stats = self.engine.stats()
        except BaseException as exc:  # noqa: BLE001 - every open stream must hear about it
            log.exception("engine thread died")
            self._dead = exc
            self._end_streams(EngineDeadError(f"engine died: {exc}"))

    def _end_streams(self, error: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for loop, stream in streams:
            if not loop.is_closed():
                loop.call_soon_threadsafe(stream.put_nowait, error)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued adds/aborts; wait for one if the engine is idle. False on stop."""
        applied = False
        while True:
            try:
                cmd = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                if applied:  # stats change even when no step follows (a KV release)
                    self._stats = self.engine.stats()
                return True
            applied = True
            if cmd is _STOP:
                return False
            if isinstance(cmd, _Add):
                self._add(cmd)
            elif isinstance(cmd, _Abort):
                self.engine.abort_request(cmd.request_id)
            elif isinstance(cmd, _Call):
                cmd.fn(self.engine)
            block = False

    def _add(self, cmd: _Add) -> None:
        reservation = None
        try:
            reservation = self.engine.add_request(
                cmd.request_id, cmd.prompt, cmd.params, prefill_only=cmd.prefill_only,
                remote_prefill_min_tokens=cmd.remote.min_uncached_tokens if cmd.remote is not None else None,
                multimodal=cmd.multimodal,
            )  # fmt: skip
        except ValueError as exc:
            self._send(cmd.request_id, exc)
        if cmd.remote is not None:
            future = cmd.remote.reserved
            loop = future.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future, reservation)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._send(out.request_id, out)

    def _send(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
