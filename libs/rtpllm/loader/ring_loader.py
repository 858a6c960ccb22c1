"""CUDA destinations: reader threads read extents into pinned host buffers of their own and
each copies what it read to the GPU asynchronously on a stream of its own, reusing a buffer
once its copies are done.

See fast_loader for the design and where the time goes. With only CPU destinations
(tests) the same pipeline runs with plain buffers and synchronous copies.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rtpllm.loader.cuda_copy import cuda_runtime
from rtpllm.loader.destinations import CastAssembler, dest_bytes, host_view
from rtpllm.loader.file_reader import CheckpointFile, read_into
from rtpllm.loader.load_plan import ALIGN, LoadPlan, Piece, align_up
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
    native: int = 0  # 1: the C reader loop ran it (native_ring)
    hint_s: float = 0.0  # native: mincore probes and WILLNEED hints for uncached extents
    hinted: int = 0  # native: extents hinted (not in the page cache)

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
    reader's own stream of each device, record an event, move on; a slot is read into
    again only after its event fired. Readers launching their own copies keeps the
    calling thread (and a queue handoff) off the path of every extent. A stream per
    reader lets the copy engines take whichever reader's extent is ready instead of
    draining one FIFO in launch order. Pieces of cast tensors go on one shared stream per
    device instead: the cast launched after a tensor's last piece must run after all of
    its pieces' copies, whichever readers launched them.
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
        self.streams: dict[torch.device, torch.cuda.Stream] = {}  # shared: cast pieces and casts
        self._origin: dict[torch.device, torch.cuda.Event] = {}  # the destinations are ready
        self._reader_streams: list[torch.cuda.Stream] = []  # every reader's, joined by run()
        # Direct CUDA pieces are copied with cudaMemcpyAsync on raw addresses (cuda_copy);
        # cast pieces, CPU destinations and a torch without a loadable runtime use copy_.
        # One device only: a stream handle passed to cudaMemcpyAsync must belong to the
        # calling thread's current device (torch's copy_ switches devices for us).
        self._runtime = cuda_runtime() if len(self.devices) == 1 else None
        self._dest_ptr = {t: b.data_ptr() for t, b in self.dest_bytes.items() if b.device.type == "cuda"}
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
        for dev, stream in self.streams.items():
            # The destinations were allocated (and maybe written) on the current stream:
            # every copy into them waits for that (readers' streams through _origin).
            self._origin[dev] = torch.cuda.current_stream(dev).record_event()
            stream.wait_event(self._origin[dev])
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
            for stream in [*self.streams.values(), *self._reader_streams]:
                torch.cuda.current_stream(stream.device).wait_stream(stream)
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
            own: dict[torch.device, torch.cuda.Stream] = {}
            for dev in self.devices:
                own[dev] = torch.cuda.Stream(device=dev)
                own[dev].wait_event(self._origin[dev])
            with self._buffers_lock:
                self._reader_streams.extend(own.values())
            with contextlib.ExitStack() as ctx:
                for stream in own.values():
                    ctx.enter_context(torch.cuda.stream(stream))
                self._read_extents(own)
        except BaseException as exc:  # handed to the calling thread, which raises it
            self.done.put((0, exc))

    def _read_extents(self, own: dict[torch.device, torch.cuda.Stream]) -> None:
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
                mine.slot_wait_s += t1 - t0
                # An unaligned buffer (never seen with pinned slots) cannot take O_DIRECT.
                direct = self.direct_io if slot.aligned else False
                mine.direct_reads += read_into(
                    self.files[e.path], slot.view, e.offset, e.nbytes, direct=direct
                )
                t2 = time.perf_counter()
                slot.copies = self._copy_out(e.pieces, slot.tensor, slot.address, own)
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

    def _copy_direct(
        self,
        p: Piece,
        src: torch.Tensor,
        src_address: int,
        own: dict[torch.device, torch.cuda.Stream],
        used: set[torch.cuda.Stream],
    ) -> None:
        """Launch the copy of a direct tensor's piece into the destination's bytes: on the
        reader's stream of its CUDA device (adding it to `used`), or synchronously on the CPU."""
        t = p.tensor
        dst_address = self._dest_ptr.get(t) if self._runtime is not None else None
        if dst_address is not None:
            stream = own[t.dest.device]
            self._runtime.copy_h2d(  # type: ignore[union-attr]
                dst_address + p.tensor_offset, src_address + p.extent_offset, p.nbytes, stream.cuda_stream
            )
            used.add(stream)
            return
        dst = self.dest_bytes[t][p.tensor_offset : p.tensor_offset + p.nbytes]
        on_cuda = dst.device.type == "cuda"
        dst.copy_(src[p.extent_offset : p.extent_offset + p.nbytes], non_blocking=on_cuda)
        if on_cuda:
            used.add(own[dst.device])

    def _copy_out(
        self,
        pieces: Iterable[Piece],
        src: torch.Tensor,
        src_address: int,
        own: dict[torch.device, torch.cuda.Stream],
    ) -> list[torch.cuda.Event]:
        """Launch the copies of `pieces` of an extent (in `src`) into their destinations, direct pieces
        on the reader's streams `own` (current), cast pieces on the shared ones; events
        that fire when the CUDA ones are done (CPU copies are done on return)."""
        used: set[torch.cuda.Stream] = set()
        for p in pieces:
            t = p.tensor
            if t.direct:
                self._copy_direct(p, src, src_address, own, used)
                continue
            piece = src[p.extent_offset : p.extent_offset + p.nbytes]
            if t.dest.device.type != "cuda":
                self.cast.temp(t)[p.tensor_offset : p.tensor_offset + p.nbytes].copy_(piece)
                self.cast.piece_done(t)
                continue
            shared = self.streams[t.dest.device]
            with torch.cuda.stream(shared):
                # The last piece's reader casts, on the stream of every piece's copy, all
                # launched before their pieces were counted: the cast runs after them.
                self.cast.temp(t)[p.tensor_offset : p.tensor_offset + p.nbytes].copy_(
                    piece, non_blocking=True
                )
                self.cast.piece_done(t)
            used.add(shared)
        return [stream.record_event() for stream in used]


def _plain_slot(nbytes: int) -> torch.Tensor:
    """A ring slot for CPU destinations: plain memory, ALIGN-aligned for O_DIRECT."""
    raw = torch.from_numpy(np.empty(nbytes + ALIGN, dtype=np.uint8))
    skip = -raw.data_ptr() % ALIGN
    return raw[skip : skip + nbytes]
