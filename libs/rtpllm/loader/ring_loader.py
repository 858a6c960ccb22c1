"""CUDA destinations: reader threads fill a ring of pinned host buffers, the calling thread
copies each filled buffer to the GPU asynchronously and recycles it when the copy is done.

See fast_loader for the design and where the time goes. With only CPU destinations
(tests) the same pipeline runs with plain buffers and synchronous copies.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rtpllm.loader.destinations import CastAssembler, dest_bytes, host_view
from rtpllm.loader.file_reader import CheckpointFile, read_into
from rtpllm.loader.load_plan import ALIGN, LoadPlan, align_up

log = logging.getLogger(__name__)


class RingLoader:
    """Reader threads fill a ring of host buffers; this thread copies them out (async for CUDA)."""

    def __init__(
        self,
        plan: LoadPlan,
        files: dict[Path, CheckpointFile],
        threads: int,
        depth: int,
        direct_io: bool | None,
        progress: Callable[[int, int], None] | None,
    ):
        self.plan, self.files, self.progress = plan, files, progress
        self.threads = max(1, min(threads, len(plan.extents)))
        self.cast = CastAssembler(plan)
        self.dest_bytes = {t: dest_bytes(t) for t in plan.tensors if t.direct and t.nbytes}
        self.devices = sorted({t.dest.device for t in plan.tensors if t.dest.device.type == "cuda"}, key=str)
        self.depth = max(1, min(depth, len(plan.extents)))
        # Every slot must hold the largest extent rounded up to ALIGN, for O_DIRECT.
        self.slot_bytes = align_up(max((e.nbytes for e in plan.extents), default=ALIGN))
        self.pinned = bool(self.devices)
        self.direct_io = direct_io
        # Slots are allocated on demand by the readers, so the first reads start after
        # one slot's allocation instead of the whole ring's (pinning is slow).
        self.slots: list[torch.Tensor] = []
        self.views: list[memoryview] = []
        self.aligned: list[bool] = []
        self.alloc_seconds = 0.0
        self.direct_reads = 0
        self._alloc_lock = threading.Lock()
        self.free: queue.Queue[int | None] = queue.Queue()
        self.done: queue.Queue[tuple[int, int, BaseException | None]] = queue.Queue()
        self.stop = threading.Event()
        self._next = iter(range(len(plan.extents)))
        self._next_lock = threading.Lock()

    def _acquire_slot(self) -> int | None:
        """A free slot, a new one while the ring is below its depth, else wait for one."""
        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        with self._alloc_lock:
            if len(self.slots) < self.depth:
                t0 = time.perf_counter()
                buf = _allocate_slot(self.slot_bytes, pinned=self.pinned)
                self.views.append(host_view(buf))
                self.aligned.append(buf.data_ptr() % ALIGN == 0)
                self.slots.append(buf)  # last: the consumer may index it once a read reports it
                self.alloc_seconds += time.perf_counter() - t0
                return len(self.slots) - 1
        return self.free.get()

    def run(self) -> None:
        t0 = time.perf_counter()
        workers = [
            threading.Thread(target=self._reader, name=f"rtpllm-load-{i}", daemon=True)
            for i in range(self.threads)
        ]
        streams = {d: torch.cuda.Stream(device=d) for d in self.devices}
        for dev, stream in streams.items():
            # The destinations were allocated (and maybe written) on the current stream.
            stream.wait_stream(torch.cuda.current_stream(dev))
        for w in workers:
            w.start()
        try:
            with contextlib.ExitStack() as ctx:
                for stream in streams.values():
                    ctx.enter_context(torch.cuda.stream(stream))
                self._consume(streams)
        finally:
            self.stop.set()
            for _ in workers:
                self.free.put(None)  # wake readers blocked on a slot
            for w in workers:
                w.join()
            for dev, stream in streams.items():
                torch.cuda.current_stream(dev).wait_stream(stream)
                stream.synchronize()
        log.debug(
            "ring: %d x %.1f MiB %s slots (%.3f s allocating), %d readers, %d/%d extents O_DIRECT, %.3f s",
            len(self.slots),
            self.slot_bytes / 2**20,
            "pinned" if self.pinned else "plain",
            self.alloc_seconds,
            self.threads,
            self.direct_reads,
            len(self.plan.extents),
            time.perf_counter() - t0,
        )

    def _reader(self) -> None:
        idx = slot = -1
        try:
            while not self.stop.is_set():
                with self._next_lock:
                    idx = next(self._next, -1)
                if idx < 0:
                    return
                got = self._acquire_slot()
                if got is None or self.stop.is_set():
                    return
                slot = got
                e = self.plan.extents[idx]
                # An unaligned buffer (never seen with cudaHostAlloc) cannot take O_DIRECT.
                direct = self.direct_io if self.aligned[slot] else False
                if read_into(self.files[e.path], self.views[slot], e.offset, e.nbytes, direct=direct):
                    self.direct_reads += 1  # only for the log line; a race loses a count at worst
                self.done.put((idx, slot, None))
        except BaseException as exc:  # handed to the consuming thread, which raises it
            self.done.put((idx, slot, exc))

    def _consume(self, streams: dict[torch.device, torch.cuda.Stream]) -> None:
        pending: deque[tuple[int, list[torch.cuda.Event]]] = deque()
        done_bytes = 0
        for _ in range(len(self.plan.extents)):
            idx, slot, err = self._next_done(pending)
            if err is not None:
                raise err
            e = self.plan.extents[idx]
            src = self.slots[slot]
            used: set[torch.device] = set()
            for p in e.pieces:
                t = p.tensor
                if t.direct:
                    dst = self.dest_bytes[t][p.tensor_offset : p.tensor_offset + p.nbytes]
                else:
                    dst = self.cast.temp(t)[p.tensor_offset : p.tensor_offset + p.nbytes]
                on_cuda = dst.device.type == "cuda"
                dst.copy_(src[p.extent_offset : p.extent_offset + p.nbytes], non_blocking=on_cuda)
                if on_cuda:
                    used.add(dst.device)
                if not t.direct:
                    self.cast.piece_done(t)
            if used:
                events = [torch.cuda.Event() for _ in used]
                for ev, dev in zip(events, used, strict=True):
                    ev.record(streams[dev])
                pending.append((slot, events))
            else:
                self.free.put(slot)  # CPU copies are already done
            # Recycle slots whose copies finished, without waiting.
            while pending and all(ev.query() for ev in pending[0][1]):
                self.free.put(pending.popleft()[0])
            done_bytes += e.nbytes
            if self.progress is not None:
                self.progress(done_bytes, self.plan.read_bytes)

    def _next_done(
        self, pending: deque[tuple[int, list[torch.cuda.Event]]]
    ) -> tuple[int, int, BaseException | None]:
        # While no read has finished, free the oldest slot still copying: the readers
        # may be waiting for exactly that slot.
        while True:
            try:
                return self.done.get_nowait()
            except queue.Empty:
                pass
            if not pending:
                return self.done.get()
            slot, events = pending.popleft()
            for ev in events:
                ev.synchronize()
            self.free.put(slot)


def _allocate_slot(nbytes: int, *, pinned: bool) -> torch.Tensor:
    """One ring slot: pinned for async H2D (cudaHostAlloc is page-aligned), else plain and aligned."""
    if pinned:
        # torch's host allocator caches the block after the load, for the next one.
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    raw = torch.from_numpy(np.empty(nbytes + ALIGN, dtype=np.uint8))
    skip = -raw.data_ptr() % ALIGN
    return raw[skip : skip + nbytes]
