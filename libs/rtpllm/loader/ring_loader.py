"""CUDA destinations: reader threads read extents into pinned host buffers of their own and
each copies what it read to the GPU asynchronously, reusing a buffer once its copies are done.

See fast_loader for the design and where the time goes. With only CPU destinations
(tests) the same pipeline runs with plain buffers and synchronous copies.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rtpllm.loader.cuda_copy import cuda_runtime
from rtpllm.loader.destinations import CastAssembler, dest_bytes, host_view
from rtpllm.loader.file_reader import CheckpointFile, read_into
from rtpllm.loader.load_plan import ALIGN, Extent, LoadPlan, align_up
from rtpllm.loader.pinned import PinnedBuffer

log = logging.getLogger(__name__)


@dataclass
class RingTimings:
    """Where one load's time went (seconds; reader figures are summed over the readers).

    A fast warm load has readers busy reading nearly all the time (read_s close to
    readers x wall_s); slot_wait_s says readers waited for their buffers' copies to the
    GPU (the H2D side is the limit), issue_s is the Python cost of launching the copies.
    """

    wall_s: float = 0.0
    readers: int = 0
    slots: int = 0
    slot_mib: float = 0.0
    alloc_s: float = 0.0  # allocating (pinning) ring slots, summed over readers
    read_s: float = 0.0  # inside preadv
    slot_wait_s: float = 0.0  # readers blocked until their slot's copies to the GPU finished
    issue_s: float = 0.0  # readers launching copies (and casts)
    direct_reads: int = 0
    extents: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class _Slot:
    """One reader's host buffer and the copies still reading it."""

    tensor: torch.Tensor
    view: memoryview
    aligned: bool  # O_DIRECT needs an ALIGN-aligned buffer
    address: int  # tensor.data_ptr()
    copies: list[torch.cuda.Event] = field(default_factory=list)


class RingLoader:
    """Reader threads read extents into their own host buffers and copy them out (async for CUDA).

    Each reader owns `depth // threads` slots (at least one) and cycles through them:
    read an extent into the next slot, launch its copies to the destinations on the
    shared side stream of each device, record an event, move on; a slot is read into
    again only after its event fired. Readers launching their own copies keeps the
    calling thread (and a queue handoff) off the path of every extent.
    """

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
        self.slots_per_reader = max(1, depth // self.threads)
        self.cast = CastAssembler(plan)
        self.dest_bytes = {t: dest_bytes(t) for t in plan.tensors if t.direct and t.nbytes}
        self.devices = sorted({t.dest.device for t in plan.tensors if t.dest.device.type == "cuda"}, key=str)
        # Every slot must hold the largest extent rounded up to ALIGN, for O_DIRECT.
        self.slot_bytes = align_up(max((e.nbytes for e in plan.extents), default=ALIGN))
        self.pinned = bool(self.devices)
        self.direct_io = direct_io
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        # Direct CUDA pieces are copied with cudaMemcpyAsync on raw addresses (cuda_copy);
        # cast pieces, CPU destinations and a torch without a loadable runtime use copy_.
        # One device only: a stream handle passed to cudaMemcpyAsync must belong to the
        # calling thread's current device (torch's copy_ switches devices for us).
        self._runtime = cuda_runtime() if len(self.devices) == 1 else None
        self._dest_ptr = {t: b.data_ptr() for t, b in self.dest_bytes.items() if b.device.type == "cuda"}
        self._stream_ptr: dict[torch.device, int] = {}
        self.timings = RingTimings(
            readers=self.threads, extents=len(plan.extents), slot_mib=self.slot_bytes / 2**20
        )
        self.done: queue.Queue[tuple[int, BaseException | None]] = queue.Queue()  # (bytes, error) per extent
        self.stop = threading.Event()
        self._next = iter(range(len(plan.extents)))
        self._next_lock = threading.Lock()
        self._buffers: list[PinnedBuffer] = []  # pinned slots' owners, closed after run()
        self._buffers_lock = threading.Lock()

    def run(self) -> None:
        t0 = time.perf_counter()
        self.streams = {d: torch.cuda.Stream(device=d) for d in self.devices}
        self._stream_ptr = {d: s.cuda_stream for d, s in self.streams.items()}
        for dev, stream in self.streams.items():
            # The destinations were allocated (and maybe written) on the current stream.
            stream.wait_stream(torch.cuda.current_stream(dev))
        workers = [
            threading.Thread(target=self._reader, name=f"rtpllm-load-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for w in workers:
            w.start()
        try:
            done_bytes = 0
            for _ in range(len(self.plan.extents)):
                nbytes, err = self.done.get()
                if err is not None:
                    raise err
                done_bytes += nbytes
                if self.progress is not None:
                    self.progress(done_bytes, self.plan.read_bytes)
        finally:
            self.stop.set()
            for w in workers:
                w.join()
            for dev, stream in self.streams.items():
                torch.cuda.current_stream(dev).wait_stream(stream)
                stream.synchronize()
            # Every copy out of the slots has finished: give them back.
            for buffer in self._buffers:
                buffer.close()
            self._buffers.clear()
        self.timings.wall_s = time.perf_counter() - t0
        log.debug("ring (%s slots): %s", "pinned" if self.pinned else "plain", self.timings.as_dict())

    def _reader(self) -> None:
        try:
            if self.devices:  # pin slots from the destination's context, not device 0's
                torch.cuda.set_device(self.devices[0])
            with contextlib.ExitStack() as ctx:
                for stream in self.streams.values():
                    ctx.enter_context(torch.cuda.stream(stream))
                self._read_extents()
        except BaseException as exc:  # handed to the calling thread, which raises it
            self.done.put((0, exc))

    def _read_extents(self) -> None:
        slots: list[_Slot] = []
        turn = 0
        mine = RingTimings()  # this reader's sums, added to the load's when it stops
        try:
            while not self.stop.is_set():
                with self._next_lock:
                    idx = next(self._next, -1)
                if idx < 0:
                    return
                if turn == len(slots):
                    slots.append(self._new_slot(mine))
                slot = slots[turn]
                turn = (turn + 1) % self.slots_per_reader
                t0 = time.perf_counter()
                for ev in slot.copies:
                    ev.synchronize()
                e = self.plan.extents[idx]
                t1 = time.perf_counter()
                # An unaligned buffer (never seen with pinned slots) cannot take O_DIRECT.
                direct = self.direct_io if slot.aligned else False
                mine.direct_reads += read_into(
                    self.files[e.path], slot.view, e.offset, e.nbytes, direct=direct
                )
                t2 = time.perf_counter()
                slot.copies = self._copy_out(e, slot.tensor, slot.address)
                mine.slot_wait_s += t1 - t0
                mine.read_s += t2 - t1
                mine.issue_s += time.perf_counter() - t2
                self.done.put((e.nbytes, None))
        finally:
            with self._buffers_lock:
                for name in ("slots", "alloc_s", "read_s", "slot_wait_s", "issue_s", "direct_reads"):
                    setattr(self.timings, name, getattr(self.timings, name) + getattr(mine, name))

    def _new_slot(self, mine: RingTimings) -> _Slot:
        """A slot of this reader's (pinning runs concurrently in every reader)."""
        t0 = time.perf_counter()
        if self.pinned:
            owner = PinnedBuffer(self.slot_bytes)
            with self._buffers_lock:
                self._buffers.append(owner)
            buf = owner.tensor
        else:
            buf = _plain_slot(self.slot_bytes)
        mine.slots += 1
        mine.alloc_s += time.perf_counter() - t0
        return _Slot(buf, host_view(buf), buf.data_ptr() % ALIGN == 0, buf.data_ptr())

    def _copy_out(self, e: Extent, src: torch.Tensor, src_address: int) -> list[torch.cuda.Event]:
        """Launch the copies of extent `e` (in `src`) into its destinations; events that
        fire when the CUDA ones are done (CPU copies are done on return)."""
        used: set[torch.device] = set()
        for p in e.pieces:
            t = p.tensor
            dst_address = self._dest_ptr.get(t) if self._runtime is not None else None
            if dst_address is not None:
                dev = t.dest.device
                self._runtime.copy_h2d(  # type: ignore[union-attr]
                    dst_address + p.tensor_offset,
                    src_address + p.extent_offset,
                    p.nbytes,
                    self._stream_ptr[dev],
                )
                used.add(dev)
                continue
            if t.direct:
                dst = self.dest_bytes[t][p.tensor_offset : p.tensor_offset + p.nbytes]
            else:
                dst = self.cast.temp(t)[p.tensor_offset : p.tensor_offset + p.nbytes]
            on_cuda = dst.device.type == "cuda"
            dst.copy_(src[p.extent_offset : p.extent_offset + p.nbytes], non_blocking=on_cuda)
            if on_cuda:
                used.add(dst.device)
            if not t.direct:
                # The last piece's reader casts, on the same stream as every piece's copy,
                # all launched before their pieces were counted: the cast runs after them.
                self.cast.piece_done(t)
        events = []
        for dev in used:
            ev = torch.cuda.Event()
            ev.record(self.streams[dev])
            events.append(ev)
        return events


def _plain_slot(nbytes: int) -> torch.Tensor:
    """A ring slot for CPU destinations: plain memory, ALIGN-aligned for O_DIRECT."""
    raw = torch.from_numpy(np.empty(nbytes + ALIGN, dtype=np.uint8))
    skip = -raw.data_ptr() % ALIGN
    return raw[skip : skip + nbytes]
