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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rtpllm.loader.destinations import CastAssembler, dest_bytes, host_view
from rtpllm.loader.file_reader import CheckpointFile, read_into
from rtpllm.loader.load_plan import ALIGN, LoadPlan, align_up
from rtpllm.loader.pinned import PinnedBuffer

log = logging.getLogger(__name__)


@dataclass
class RingTimings:
    """Where one load's time went (seconds; reader figures are summed over the readers).

    A fast warm load has readers busy reading nearly all the time (read_s close to
    readers x wall_s); slot_wait_s says readers waited for the copies (the H2D side is
    the limit), consumer_wait_s that the copies waited for reads (the read side is).
    """

    wall_s: float = 0.0
    readers: int = 0
    slots: int = 0
    slot_mib: float = 0.0
    alloc_s: float = 0.0  # allocating (pinning) ring slots, summed over readers
    read_s: float = 0.0  # inside preadv
    slot_wait_s: float = 0.0  # readers blocked until a slot came back from the GPU copies
    consumer_wait_s: float = 0.0  # the copying thread blocked on reads or copy events
    direct_reads: int = 0
    extents: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


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
        self._buffers: list[PinnedBuffer] = []  # the pinned slots' owners, closed after run()
        self.aligned: list[bool] = []
        self._allocating = 0  # slots being allocated right now (outside the lock)
        self.timings = RingTimings(
            readers=self.threads, extents=len(plan.extents), slot_mib=self.slot_bytes / 2**20
        )
        self._alloc_lock = threading.Lock()
        self.free: queue.Queue[int | None] = queue.Queue()
        self.done: queue.Queue[tuple[int, int, BaseException | None]] = queue.Queue()
        self.stop = threading.Event()
        self._next = iter(range(len(plan.extents)))
        self._next_lock = threading.Lock()

    def _acquire_slot(self) -> int | None:
        """A free slot, a new one while the ring is below its depth, else wait for one.

        Readers allocate their slots concurrently (pinning 16 MiB takes milliseconds,
        and serializing it delayed the last reader's first read by all the others');
        a slot joins the ring under the lock once allocated.
        """
        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        with self._alloc_lock:
            grow = len(self.slots) + self._allocating < self.depth
            if grow:
                self._allocating += 1
        if grow:
            t0 = time.perf_counter()
            try:
                owner = PinnedBuffer(self.slot_bytes) if self.pinned else None
                buf = owner.tensor if owner is not None else _plain_slot(self.slot_bytes)
            except BaseException:
                with self._alloc_lock:
                    self._allocating -= 1
                raise
            view, aligned = host_view(buf), buf.data_ptr() % ALIGN == 0
            with self._alloc_lock:
                self._allocating -= 1
                if owner is not None:
                    self._buffers.append(owner)
                self.views.append(view)
                self.aligned.append(aligned)
                self.slots.append(buf)  # last: the consumer may index it once a read reports it
                self.timings.alloc_s += time.perf_counter() - t0
                return len(self.slots) - 1
        t0 = time.perf_counter()
        slot = self.free.get()
        self.timings.slot_wait_s += time.perf_counter() - t0  # a race loses a sample at worst
        return slot

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
            # Every copy out of the ring has finished: give the slots back.
            self.timings.slots = len(self.slots)
            self.views.clear()
            self.slots.clear()
            for buffer in self._buffers:
                buffer.close()
            self._buffers.clear()
        self.timings.wall_s = time.perf_counter() - t0
        log.debug("ring (%s slots): %s", "pinned" if self.pinned else "plain", self.timings.as_dict())

    def _reader(self) -> None:
        idx = slot = -1
        try:
            if self.devices:  # pin slots from the destination's context, not device 0's
                torch.cuda.set_device(self.devices[0])
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
                t0 = time.perf_counter()
                used_direct = read_into(
                    self.files[e.path], self.views[slot], e.offset, e.nbytes, direct=direct
                )
                # Unlocked sums: only for the timings, a race loses a sample at worst.
                self.timings.read_s += time.perf_counter() - t0
                self.timings.direct_reads += used_direct
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
        t0 = time.perf_counter()
        try:
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
        finally:
            self.timings.consumer_wait_s += time.perf_counter() - t0


def _plain_slot(nbytes: int) -> torch.Tensor:
    """A ring slot for CPU destinations: plain memory, ALIGN-aligned for O_DIRECT."""
    raw = torch.from_numpy(np.empty(nbytes + ALIGN, dtype=np.uint8))
    skip = -raw.data_ptr() % ALIGN
    return raw[skip : skip + nbytes]
