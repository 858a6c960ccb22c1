"""shm backend (same host): payloads go through a shared-memory ring, only descriptors
travel on the control connection.

The receiver creates a ring per connection: a /dev/shm file of `slots` x `slot_bytes`,
fully allocated up front (so a full /dev/shm fails cleanly here, not with SIGBUS later).
The sender maps it and unlinks its name at once, so the memory goes away with the last
process that maps it, whichever side crashes. A receiver also removes the name when the
connection ends (the sender may never have attached), and at start it sweeps rings left
by dead processes (the creator's pid is in the name).

Sender: take a free slot, gather one layer of a group of blocks into it, CRC it, send
`ShmBlocks(slot, crc)`; the slot is free again when the receiver acks (or refuses) that
frame. Receiver: CRC the slot, copy it into the pool, ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import secrets
from collections import deque
from typing import TYPE_CHECKING

import numpy as np
import torch

from rtpllm.transfer import faults
from rtpllm.transfer.backend import BackendUnavailable, RecvPath, SendPath, plan_frames, verify_and_scatter
from rtpllm.transfer.checksum import crc32
from rtpllm.transfer.endpoint import SHM_DIR
from rtpllm.transfer.errors import TransferAborted, TransferRefused
from rtpllm.transfer.framing import ShmBlocks, Welcome

if TYPE_CHECKING:
    from rtpllm.transfer.incoming import IncomingTransfer
    from rtpllm.transfer.outgoing import OutgoingTransfer
    from rtpllm.transfer.recv_link import RecvLink
    from rtpllm.transfer.send_link import SendLink

RING_PREFIX = "rtpllm-kv-"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class ShmRing:
    """A shared-memory file of `slots` equal slots, mapped in this process."""

    def __init__(self, path: str, slots: int, slot_bytes: int, fd: int) -> None:
        self.path = path
        self.slots = slots
        self.slot_bytes = slot_bytes
        try:
            self._mm: mmap.mmap | None = mmap.mmap(fd, slots * slot_bytes, flags=mmap.MAP_SHARED | _POPULATE)
        finally:
            os.close(fd)
        self._tensor: torch.Tensor | None = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._registered = False

    @classmethod
    def create(cls, slots: int, slot_bytes: int) -> ShmRing:
        path = os.path.join(SHM_DIR, f"{RING_PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, slots * slot_bytes)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        try:
            return cls(path, slots, slot_bytes, fd)
        except BaseException:
            os.unlink(path)
            raise

    @classmethod
    def attach(cls, path: str, slots: int, slot_bytes: int) -> ShmRing:
        if not os.path.basename(path).startswith(RING_PREFIX) or os.path.dirname(path) != SHM_DIR:
            raise ValueError(f"not a ring path: {path}")
        fd = os.open(path, os.O_RDWR)
        if os.fstat(fd).st_size != slots * slot_bytes:
            os.close(fd)
            raise ValueError(f"ring {path} has the wrong size")
        return cls(path, slots, slot_bytes, fd)

    def slot(self, index: int, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of slot `index`, as a uint8 tensor over the shared memory."""
        assert self._tensor is not None
        start = index * self.slot_bytes
        return self._tensor[start : start + nbytes]

    def pin_for(self, device: torch.device) -> None:
        """Page-lock the ring for fast DMA to/from `device` (best effort)."""
        if self._registered or self._tensor is None:
            return
        try:
            rc = torch.cuda.cudart().cudaHostRegister(self._tensor.data_ptr(), self._tensor.numel(), 0)
            self._registered = int(rc) == 0
        except Exception:  # noqa: BLE001 -- an optimisation only
            self._registered = False

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        """Drop this process's mapping. Callers make sure no copy into or out of the ring
        is running. The mapping is not closed explicitly: tensors over it do not pin the
        mmap's buffer export, so an explicit close could unmap memory a stray tensor still
        points to; the mmap object is unmapped when its last tensor is gone."""
        if self._tensor is None:
            return
        if self._registered:
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(self._tensor.data_ptr())
        self._tensor = None
        self._mm = None


def sweep_stale_rings() -> int:
    """Remove rings whose creating process is gone; returns how many."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(RING_PREFIX):
            continue
        try:
            pid = int(name[len(RING_PREFIX) :].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
        except (ValueError, PermissionError):
            continue
    return removed


class ShmSendPath(SendPath):
    name = "shm"

    def __init__(self, link: SendLink) -> None:
        super().__init__(link)
        self._ring: ShmRing | None = None
        self._free: deque[int] = deque()

    async def setup(self, welcome: Welcome) -> None:
        try:
            self._ring = ShmRing.attach(welcome.shm_path, welcome.shm_slots, welcome.shm_slot_bytes)
        except (OSError, ValueError) as exc:
            raise BackendUnavailable(f"cannot map the receiver's shm ring {welcome.shm_path}: {exc}") from exc
        self._ring.unlink()  # from now on the ring dies with the last process mapping it
        if self.link.pool.is_cuda:
            self._ring.pin_for(self.link.pool.device)
        self._free = deque(range(welcome.shm_slots))
        self.link.limit_frame_bytes(welcome.shm_slot_bytes)

    def _fill(self, slot: torch.Tensor, layer: int, ids: np.ndarray, corrupt: bool) -> int:
        pool = self.link.pool
        pool.gather(layer, ids, slot)
        crc = crc32([memoryview(slot.numpy())])
        if corrupt:
            slot[0] ^= 0xFF
        return crc

    async def _fill_next(self, layer: int, ids: np.ndarray, corrupt: bool) -> tuple[int, int]:
        """Take a free slot and fill it: (slot, crc)."""
        link = self.link
        await link.wait_until(lambda: bool(self._free), "free shm slot (acknowledgement)")
        ring = self._ring
        if ring is None:  # the connection closed meanwhile
            link.check()
            raise TransferAborted("connection to the receiver was closed")
        index = self._free.popleft()
        fill = link.submit(
            self._fill, ring.slot(index, link.pool.payload_bytes(len(ids), layer)), layer, ids, corrupt
        )
        try:
            crc = await asyncio.shield(fill)
        except BaseException:
            # The slot is free again once the thread no longer writes it.
            fill.add_done_callback(lambda _, index=index: self._free.append(index))
            raise
        return index, crc

    async def send(self, transfer: OutgoingTransfer, src_ids: np.ndarray, dest_index: int) -> int:
        link, pool = self.link, self.link.pool
        pool.follow_engine()
        frames = list(plan_frames(src_ids, dest_index, pool.layout.num_layers, link.blocks_per_frame))
        # Up to `prefetch` slots are filled at once on worker threads; descriptors go out in order.
        pending: deque[asyncio.Future[tuple[int, int]]] = deque()
        started = 0

        def top_up() -> None:
            nonlocal started
            while started < len(frames) and len(pending) < link.prefetch:
                ids, _, layer = frames[started]
                pending.append(asyncio.ensure_future(self._fill_next(layer, ids, faults.take_corruption())))
                started += 1

        shipped = 0
        sent = 0
        try:
            top_up()
            while pending:
                index, crc = await pending.popleft()
                ids, dest, layer = frames[sent]
                sent += 1
                seq = link.next_seq()
                link.track(seq, lambda index=index: self._free.append(index))
                top_up()
                link.check()
                await link.send_frame(ShmBlocks(transfer.transfer_id, seq, layer, dest, len(ids), crc, index))
                shipped += pool.payload_bytes(len(ids), layer)
        finally:
            for fut in pending:
                fut.cancel()
            for result in await asyncio.gather(*pending, return_exceptions=True):
                if isinstance(result, tuple):  # filled but never announced
                    self._free.append(result[0])
        return shipped

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None


class ShmRecvPath(RecvPath):
    name = "shm"
    frame_type = ShmBlocks

    def __init__(self, link: RecvLink) -> None:
        super().__init__(link)
        self._ring: ShmRing | None = None

    def welcome(self) -> Welcome:
        link = self.link
        unit = link.pool.max_layer_bytes  # a slot holds a frame of any layer
        slot_bytes = max(unit, min(link.max_frame_bytes, link.receiver.shm_slot_bytes) // unit * unit)
        self._ring = ShmRing.create(link.receiver.shm_slots, slot_bytes)
        if link.pool.is_cuda:
            self._ring.pin_for(link.pool.device)
        return Welcome("shm", shm_path=self._ring.path, shm_slots=self._ring.slots, shm_slot_bytes=slot_bytes)

    async def land(self, frame: ShmBlocks, transfer: IncomingTransfer) -> None:
        ring = self._ring
        assert ring is not None
        nbytes = self.link.pool.payload_bytes(frame.count, frame.layer)
        if not 0 <= frame.slot < ring.slots or nbytes > ring.slot_bytes:
            transfer.fail(
                TransferRefused(f"shm frame slot {frame.slot} / {nbytes} bytes outside the ring"),
                seq=frame.seq,
            )
            return
        await self.link.slots.acquire()
        self.link.spawn(
            verify_and_scatter(self.link, frame, transfer, ring.slot(frame.slot, nbytes)), release_slot=True
        )

    def close(self) -> None:
        if self._ring is not None:
            self._ring.unlink()
            self._ring.close()
            self._ring = None
