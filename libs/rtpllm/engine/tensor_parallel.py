"""Rank 0's side of a tensor-parallel engine: start the other ranks, keep them in step,
end them.

The engine (scheduler, block manager, sampler, outputs) lives in rank 0 only. Every
step, rank 0's model runner sends the packed batch to the other ranks (`send`, through
tp_step.StepChannel), and every rank runs it on its shard; the model's collectives
pair up inside the forward. The other ranks are `rtpllm.engine.tp_worker` processes
(rtpllm.parallel.launch starts them).

Failure is final: a rank that exits, or any error while the ranks are inside a step
(they would no longer agree on which collective comes next), ends the whole group. The
step's requests fail, the engine raises `TensorParallelError` from then on, and every
other rank exits. Services treat that as the instance dying (docs/tensor_parallel.md).
"""

from __future__ import annotations

import functools
import logging
import pickle
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch
import torch.distributed as dist

from rtpllm.config import EngineConfig
from rtpllm.engine.model_runner import HostBatch
from rtpllm.engine.tp_kv import KVChannel
from rtpllm.engine.tp_step import StepChannel
from rtpllm.models.config import ModelConfig
from rtpllm.parallel.group import TPGroup, init_tp_group
from rtpllm.parallel.launch import WorkerProcesses
from rtpllm.parallel.layout import check_divisible

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

WORKER_MODULE = "rtpllm.engine.tp_worker"
# Importing torch and reading the config, before the workers join the groups.
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class WorkerPayload:
    """What rank 0 writes to each worker's stdin (pickled, length-prefixed): the config,
    the model directory rank 0 resolved (workers never download or convert), torch's
    CPU thread count and rank 0's log level."""

    config: EngineConfig
    model_dir: Path
    num_threads: int
    log_level: int = logging.WARNING


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel engine died, or a step failed while the ranks were in
    it: the engine cannot run any more steps."""


def check_supported(config: EngineConfig, model: ModelConfig) -> None:
    """ValueError for what tensor parallelism does not do (yet), before any process starts."""
    check_divisible(model, config.tensor_parallel_size)
    if model.vision is not None:
        raise ValueError(
            "tensor parallelism serves text models only; vision-language models run with tensor_parallel_size=1"
        )


class TensorParallel:
    """Rank 0 of `size` ranks: the group, the worker processes, the step channel and the
    KV channel (the ranks' KV blocks for the PD data plane, engine/sharded_blocks.py)."""

    def __init__(self, group: TPGroup, workers: WorkerProcesses) -> None:
        self.group = group
        self.workers = workers
        self.channel = StepChannel(group)
        self.kv = KVChannel(group)
        self.size = group.size
        self.error: str | None = None  # why the group broke (None while it is whole)
        # Called once, from any thread, when the group breaks (services: stop serving).
        self.on_failure: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._closed = False
        # Weakly: a forgotten engine must stay collectable (its finalizer ends the workers).
        exited = weakref.WeakMethod(self._worker_exited)
        workers.watch(lambda rank, code: (method := exited()) is not None and method(rank, code))
        # An engine that fails to start, or is never closed, still frees the group (one
        # per process) and ends the workers.
        self._finalizer = weakref.finalize(self, _abandon, group, workers)

    @classmethod
    def start(cls, config: EngineConfig, model: ModelConfig, model_dir: Path, device: str) -> TensorParallel:
        """Start ranks 1..N-1 (they load their shards while this process loads its own)
        and join the group with them."""
        check_supported(config, model)
        size = config.tensor_parallel_size
        level = logging.getLogger().getEffectiveLevel()
        payload = WorkerPayload(config, Path(model_dir), torch.get_num_threads(), level)
        workers = WorkerProcesses(size, pickle.dumps(payload), WORKER_MODULE)
        try:
            workers.wait_joined(START_TIMEOUT_S)
            group = init_tp_group(0, size, workers.store, device)
        except BaseException:
            workers.stop(grace_s=0)
            raise
        log.info("tensor parallelism: %d ranks (worker pids %s)", size, workers.pids)
        return cls(group, workers)

    # -- start-up handshake ----------------------------------------------------------

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The KV pool size every rank can hold (the smallest rank's)."""
        return self.guard(lambda: self.group.min_control(num_blocks))

    def send_shape(self, num_blocks: int, max_model_len: int) -> None:
        self.guard(lambda: self.channel.send_shape(num_blocks, max_model_len))

    # -- steps (ModelRunner's StepSender) --------------------------------------------

    def send(
        self,
        batch: HostBatch,
        spans: list[slice],
        observe: bool,
        use_graph: bool,
        fill: Callable[[torch.Tensor], None] | None,
    ) -> Callable[[torch.Tensor], None] | None:
        return self.guard(lambda: self.channel.send(batch, spans, observe, use_graph, fill))

    def failure(self, exc: BaseException) -> TensorParallelError:
        """A step failed on rank 0 while the ranks were in it: break the group, and the
        error to raise."""
        self._break(f"a step failed on rank 0: {exc}")
        return TensorParallelError(self.error or str(exc))

    # -- failure and shutdown ----------------------------------------------------------

    def guard(self, fn: Callable[[], T]) -> T:
        """Run `fn` (collectives of the group): TensorParallelError at once if the group
        is broken, and any error of `fn` breaks it (the ranks no longer agree on which
        collective comes next)."""
        if self.error is not None:
            raise TensorParallelError(self.error)
        try:
            return fn()
        except Exception as exc:
            self._break(f"lost contact with the other ranks: {exc}")
            raise TensorParallelError(self.error or str(exc)) from exc

    def _worker_exited(self, rank: int, code: int) -> None:
        self._break(f"tensor-parallel rank {rank} exited with code {code}")

    def _break(self, reason: str) -> None:
        with self._lock:
            if self.error is not None or self._closed:
                return
            self.error = reason
        log.error("tensor-parallel engine broken: %s", reason)
        # A collective blocked on a dead peer (NCCL waits, gloo does not) ends with an error.
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        try:
            nccl = (
                abort is not None
                and self.group.device_group is not None
                and dist.get_backend(self.group.device_group) == "nccl"
            )
        except (ValueError, RuntimeError):  # the group was destroyed meanwhile (close, a finalizer)
            nccl = False
        if nccl:
            try:
                abort(self.group.device_group)
            except Exception:  # noqa: BLE001 - best effort on a group that is already broken
                log.exception("aborting the NCCL group failed")
        # Whatever happened to the group, the workers stop and the engine's owner hears of it.
        self.workers.stop(grace_s=2.0)
        if self.on_failure is not None:
            self.on_failure(reason)

    def close(self, polite: bool = True) -> None:
        """Stop the other ranks (with a stop message while the group is whole and
        `polite`; else by closing their pipes) and leave the group."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            whole = self.error is None and polite
        if whole:
            try:
                # The KV channel first: its server threads end before the workers leave the groups.
                if not self.kv.stop():
                    log.warning("a KV transfer between the tensor-parallel ranks did not end; stopping them anyway")
                self.channel.stop()
            except Exception:  # noqa: BLE001 - a rank died meanwhile; stop() below ends the rest
                log.warning("could not tell the tensor-parallel ranks to stop", exc_info=True)
        self._finalizer.detach()
        self.workers.stop(grace_s=10.0 if whole else 2.0)
        self.group.destroy()


def closes_on_failure(init: Callable[P, None]) -> Callable[P, None]:
    """Decorates LLMEngine.__init__: an engine that fails after starting its other ranks
    (a KV pool too small for max_model_len, a bad checkpoint) ends them and leaves the
    group at once, rather than when it is garbage collected. No stop message: the ranks
    may be inside another collective of the start-up."""

    @functools.wraps(init)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            init(*args, **kwargs)
        except BaseException:
            tp = getattr(args[0], "tp", None)
            if isinstance(tp, TensorParallel):
                tp.close(polite=False)
            raise

    return wrapper


def _abandon(group: TPGroup, workers: WorkerProcesses) -> None:
    workers.stop(grace_s=0)
    group.destroy()
