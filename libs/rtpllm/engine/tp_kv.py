"""KV blocks between the tensor-parallel ranks' pools and rank 0, over the KV group.

The PD data plane (rtpllm.transfer) and the KV tiers (offload, kvstore) run in rank 0's
process only, while each rank's pool holds its own KV heads. So rank 0 reads and writes
the other ranks' slices of a block through this channel (engine/sharded_blocks.py joins
them into whole blocks).

Every operation is a few collectives of the KV group (gloo, host memory), in this order:
- a header [op, layer, count, slice bytes] and the `count` block ids (two broadcasts);
- read: each rank copies its slice of the blocks' layer into an 8-byte status + the
  slice, and `dist.gather`s it to rank 0;
- write: rank 0 `dist.scatter`s each rank its slice, every rank writes it into its pool
  and `dist.gather`s its status, so a write returns only once every rank has it;
- stop: the workers' server thread ends (rank 0 sends it before the control group's stop).
A rank's slice is `kv[layer].index_select(1, ids)` of its own pool, [2, count,
block_size, its KV heads, row] as bytes: the same size on every rank. With layer
`ALL_LAYERS` (the tiers' whole blocks) it is every layer of the blocks, block-major:
[count, layers, 2, block_size, its KV heads, row], one operation instead of one per layer.

Rank 0 runs one operation at a time (a lock: the data plane calls from several threads).
Each worker serves them on a thread of its own beside its step loop: the KV group is not
the control group, so a transfer never waits for a step nor a step for a transfer. A rank
that fails to read or write reports a non-zero status and the operation tells rank 0
which ranks failed; the group stays in step. An error of the group itself (a dead peer)
exits the worker at once, and rank 0's failure machinery ends the engine
(engine/tensor_parallel.py): never a hang.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from rtpllm.parallel.group import TPGroup

log = logging.getLogger(__name__)

_HEADER = 4
_STOP, _READ, _WRITE = 0, 1, 2
_STATUS = 8  # bytes of the int64 status in front of a read slice
ALL_LAYERS = -1  # the layer of an operation on whole blocks (every layer, block-major)
# How long a polite stop waits for an operation in progress (a transfer's layer).
_STOP_WAIT_S = 10.0


class KVChannel:
    """Rank 0's end: read and write every rank's slice of some blocks of one layer."""

    def __init__(self, group: TPGroup) -> None:
        self.group = group
        self._lock = threading.Lock()
        self._stopped = False

    def read(
        self, layer: int, ids: np.ndarray, nbytes: int, mine: Callable[[torch.Tensor], None]
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Every rank's slice (`nbytes` each, uint8) of blocks `ids` in `layer` (or every
        layer: `ALL_LAYERS`), rank 0's filled by `mine(buffer)`, and the ranks that failed
        to read theirs."""
        with self._lock:
            self._announce(_READ, layer, ids, nbytes)
            own = torch.empty(_STATUS + nbytes, dtype=torch.uint8)
            _set_status(own, _attempt(lambda: mine(own[_STATUS:])))
            parts = [torch.empty(_STATUS + nbytes, dtype=torch.uint8) for _ in range(self.group.size)]
            dist.gather(own, parts, dst=0, group=self.group.kv_group)
        failed = [rank for rank, part in enumerate(parts) if _status(part)]
        return [part[_STATUS:] for part in parts], failed

    def write(
        self, layer: int, ids: np.ndarray, parts: list[torch.Tensor], mine: Callable[[torch.Tensor], None]
    ) -> list[int]:
        """Rank r's slice `parts[r]` (uint8, equal sizes) into blocks `ids` of `layer` of
        its pool (rank 0's by `mine(slice)`); returns once every rank has written it, with
        the ranks that failed."""
        kv_group = self.group.kv_group
        with self._lock:
            self._announce(_WRITE, layer, ids, parts[0].numel())
            mine_slice = torch.empty_like(parts[0])
            dist.scatter(mine_slice, parts, src=0, group=kv_group)
            status = torch.tensor([_attempt(lambda: mine(mine_slice))], dtype=torch.int64)
            statuses = [torch.empty(1, dtype=torch.int64) for _ in range(self.group.size)]
            dist.gather(status, statuses, dst=0, group=kv_group)
        return [rank for rank, s in enumerate(statuses) if int(s.item())]

    def stop(self) -> bool:
        """End the workers' server threads (idempotent); False if an operation in
        progress did not finish in time (then the workers' processes end them)."""
        if not self._lock.acquire(timeout=_STOP_WAIT_S):
            return False
        try:
            if not self._stopped:
                self._stopped = True
                header = torch.tensor([_STOP, 0, 0, 0], dtype=torch.int64)
                dist.broadcast(header, src=0, group=self.group.kv_group)
            return True
        finally:
            self._lock.release()

    def _announce(self, op: int, layer: int, ids: np.ndarray, nbytes: int) -> None:
        if self._stopped:
            raise RuntimeError("the tensor-parallel KV channel is stopped")
        kv_group = self.group.kv_group
        dist.broadcast(torch.tensor([op, layer, len(ids), nbytes], dtype=torch.int64), src=0, group=kv_group)
        if len(ids):
            dist.broadcast(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)), src=0, group=kv_group)


class KVShardServer:
    """A worker rank's end: serves rank 0's reads and writes of its pool on a thread of
    its own until rank 0 says stop. On CUDA the copies run on a side stream that first
    waits for the engine's stream (the steps that wrote or last read the blocks) and is
    synchronized before the rank answers."""

    def __init__(self, group: TPGroup, kv: torch.Tensor | None) -> None:
        """`kv`: this rank's pool tensor (None for a mixed per-layer pool, which rank 0
        never moves: such requests are answered with a failure)."""
        self.group = group
        self.kv = kv
        self.cuda = kv is not None and kv.is_cuda
        # Created on the thread that runs the steps: its stream is the engine's.
        self._engine_stream = torch.cuda.current_stream(kv.device) if self.cuda and kv is not None else None
        self._stream = torch.cuda.Stream(kv.device) if self.cuda and kv is not None else None
        self._thread = threading.Thread(target=self._run, name="rtpllm-tp-kv", daemon=True)

    def start(self) -> None:
        """Serve from now on (on CUDA: after the step thread's graph captures)."""
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end (after rank 0's stop); False if it still runs."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            if self.cuda:
                assert self.kv is not None
                torch.cuda.set_device(self.kv.device)  # per thread
            while self._serve_one():
                pass
        except BaseException:  # noqa: BLE001 - the group is broken: end this rank now
            log.exception("tensor-parallel rank %d: the KV group failed", self.group.rank)
            sys.stderr.flush()
            os._exit(1)

    def _serve_one(self) -> bool:
        kv_group = self.group.kv_group
        header = torch.empty(_HEADER, dtype=torch.int64)
        dist.broadcast(header, src=0, group=kv_group)
        op, layer, count, nbytes = header.tolist()
        if op == _STOP:
            return False
        ids = torch.empty(count, dtype=torch.int64)
        if count:
            dist.broadcast(ids, src=0, group=kv_group)
        if op == _READ:
            out = torch.empty(_STATUS + nbytes, dtype=torch.uint8)
            _set_status(out, _attempt(lambda: self._read(layer, ids, out[_STATUS:])))
            dist.gather(out, None, dst=0, group=kv_group)
        elif op == _WRITE:
            src = torch.empty(nbytes, dtype=torch.uint8)
            dist.scatter(src, None, src=0, group=kv_group)
            status = torch.tensor([_attempt(lambda: self._write(layer, ids, src))], dtype=torch.int64)
            dist.gather(status, None, dst=0, group=kv_group)
        else:
            raise RuntimeError(f"unknown KV message {op} from rank 0")
        return True

    def _source(self, layer: int) -> tuple[torch.Tensor, int]:
        """The pool (view) an operation on `layer` indexes and the dim of its blocks:
        one layer [2, blocks, ...] (dim 1), or with `ALL_LAYERS` the block-major view
        [blocks, layers, 2, ...] (dim 0)."""
        kv = self.kv
        if kv is None:
            raise RuntimeError("this rank's KV pool has mixed per-layer formats: its blocks are not moved")
        if layer == ALL_LAYERS:
            return kv.permute(2, 0, 1, 3, 4, 5), 0
        return kv[layer], 1

    def _slice(self, buf: torch.Tensor, layer: int, count: int) -> torch.Tensor:
        """`buf` (uint8) as this rank's slice of `count` blocks of `layer` (or all layers)."""
        kv = self.kv
        if kv is None:
            raise RuntimeError("this rank's KV pool has mixed per-layer formats: its blocks are not moved")
        shape = (count, kv.shape[0], 2, *kv.shape[3:]) if layer == ALL_LAYERS else (2, count, *kv.shape[3:])
        need = int(np.prod(shape)) * kv.element_size()
        if buf.numel() != need:
            raise RuntimeError(f"rank 0 sent a slice of {buf.numel()} bytes, this rank's is {need}")
        return buf.view(kv.dtype).view(shape)

    def _read(self, layer: int, ids: torch.Tensor, out: torch.Tensor) -> None:
        dst = self._slice(out, layer, len(ids))
        pool, dim = self._source(layer)
        if not self.cuda:
            torch.index_select(pool, dim, ids, out=dst)
            return
        assert self._stream is not None and self._engine_stream is not None
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(self._engine_stream)
            dst.copy_(pool.index_select(dim, ids.to(pool.device, non_blocking=True)), non_blocking=True)
        self._stream.synchronize()

    def _write(self, layer: int, ids: torch.Tensor, src: torch.Tensor) -> None:
        data = self._slice(src, layer, len(ids))
        pool, dim = self._source(layer)
        if not self.cuda:
            pool.index_copy_(dim, ids, data)
            return
        assert self._stream is not None and self._engine_stream is not None
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(self._engine_stream)
            device = pool.device
            pool.index_copy_(dim, ids.to(device, non_blocking=True), data.to(device, non_blocking=True))
        self._stream.synchronize()


def _attempt(fn: Callable[[], None]) -> int:
    """0 if `fn()` ran, else 1 (the error is logged here; rank 0 hears the status)."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - reported as a status, the group stays in step
        log.exception("reading or writing KV blocks for rank 0 failed")
        return 1
    return 0


def _set_status(buf: torch.Tensor, status: int) -> None:
    buf[:_STATUS].view(torch.int64)[0] = status


def _status(buf: torch.Tensor) -> int:
    return int(buf[:_STATUS].view(torch.int64)[0].item())
