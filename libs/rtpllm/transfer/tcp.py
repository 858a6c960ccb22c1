"""tcp backend: the payload bytes follow their header on the control connection.

Sender: per frame, gather one layer of a group of blocks (CPU pool in few runs: views of
the pool, no copy; else index_select into a host buffer, pinned and on a side stream for
CUDA), CRC it off the event loop, and write it while the next frame is being prepared.
Receiver: read the payload straight into the pool's blocks when that is possible (CPU
pool, few runs), else into a staging buffer, CRC it off the loop, copy it into the pool.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import numpy as np
import torch

from rtpllm.transfer import faults
from rtpllm.transfer.backend import RecvPath, SendPath, crc_message, plan_frames, verify_and_scatter
from rtpllm.transfer.checksum import crc32
from rtpllm.transfer.errors import ChecksumMismatch
from rtpllm.transfer.framing import TcpBlocks, Welcome

if TYPE_CHECKING:
    from rtpllm.transfer.incoming import IncomingTransfer
    from rtpllm.transfer.outgoing import OutgoingTransfer
    from rtpllm.transfer.recv_link import RecvLink
    from rtpllm.transfer.send_link import SendLink

# Payloads at least this big are checksummed/copied on a worker thread, not on the loop.
OFFLOAD_BYTES = 256 << 10


def _corrupted(views: list[memoryview]) -> list[memoryview]:
    first = bytearray(views[0])
    first[0] ^= 0xFF
    return [memoryview(first), *views[1:]]


class TcpSendPath(SendPath):
    name = "tcp"

    def __init__(self, link: SendLink) -> None:
        super().__init__(link)
        # Frame i is prepared in buffer i % len(buffers): `depth` frames being prepared
        # plus the one being written.
        self._buffers: list[torch.Tensor | None] = [None] * (link.prefetch + 1)

    def _buffer(self, i: int, nbytes: int) -> torch.Tensor:
        i %= len(self._buffers)
        buf = self._buffers[i]
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[i] = self.link.pool.host_buffer(nbytes)
        return buf

    def _gather_crc(
        self, layer: int, ids: np.ndarray, buf: torch.Tensor, nbytes: int
    ) -> tuple[list[memoryview], int]:
        pool = self.link.pool
        pool.gather(layer, ids, buf)
        views = [memoryview(buf[:nbytes].numpy())]
        return views, crc32(views)

    async def _prepare(
        self, transfer: OutgoingTransfer, i: int, frame: tuple[np.ndarray, int, int]
    ) -> tuple[TcpBlocks, list[memoryview], int]:
        link, pool = self.link, self.link.pool
        ids, dest, layer = frame
        nbytes = pool.payload_bytes(len(ids), layer)
        corrupt = faults.take_corruption()
        views = pool.views(layer, ids)
        if views is None:
            gather = link.submit(self._gather_crc, layer, ids, self._buffer(i, nbytes), nbytes)
            try:
                views, crc = await asyncio.shield(gather)
            except BaseException:
                if not gather.done():  # the thread still writes that buffer: next time use another
                    self._buffers[i % len(self._buffers)] = None
                raise
        elif nbytes >= OFFLOAD_BYTES:
            crc = await link.run(crc32, views)
        else:
            crc = crc32(views)
        if corrupt:
            views = _corrupted(views)
        return TcpBlocks(transfer.transfer_id, -1, layer, dest, len(ids), crc), views, nbytes

    async def send(self, transfer: OutgoingTransfer, src_ids: np.ndarray, dest_index: int) -> int:
        link, pool = self.link, self.link.pool
        pool.follow_engine()
        frames = list(plan_frames(src_ids, dest_index, pool.layout.num_layers, link.blocks_per_frame))
        # Pipeline: the next `prefetch` frames are gathered and checksummed on worker
        # threads while this one is on the wire.
        pending: deque[asyncio.Future[tuple[TcpBlocks, list[memoryview], int]]] = deque()
        started = 0

        def top_up() -> None:
            nonlocal started
            while started < len(frames) and len(pending) < link.prefetch:
                pending.append(asyncio.ensure_future(self._prepare(transfer, started, frames[started])))
                started += 1

        shipped = 0
        try:
            top_up()
            while pending:
                header, views, nbytes = await pending.popleft()
                top_up()  # reuses the buffer of the frame written last, which is out
                link.check()
                header.seq = link.next_seq()
                link.track(header.seq)
                await link.send_frame(header, views)
                shipped += nbytes
        finally:
            for fut in pending:
                fut.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return shipped


class TcpRecvPath(RecvPath):
    name = "tcp"
    frame_type = TcpBlocks

    def __init__(self, link: RecvLink) -> None:
        super().__init__(link)
        self._staging: list[torch.Tensor] = []

    def welcome(self) -> Welcome:
        return Welcome("tcp")

    def payload_bytes(self, frame: TcpBlocks) -> int:
        return self.link.pool.payload_bytes(frame.count, frame.layer)

    def _take_buffer(self, nbytes: int) -> torch.Tensor:
        for i, buf in enumerate(self._staging):
            if buf.numel() >= nbytes:
                return self._staging.pop(i)
        return self.link.pool.host_buffer(max(nbytes, 1 << 20))

    async def land(self, frame: TcpBlocks, transfer: IncomingTransfer) -> None:
        link, pool = self.link, self.link.pool
        nbytes = pool.payload_bytes(frame.count, frame.layer)
        ids = transfer.block_ids[frame.dest_index : frame.dest_index + frame.count]
        views = pool.views(frame.layer, ids)
        await link.slots.acquire()
        try:
            if views is not None:
                if await link.read_into_pool(transfer, views):
                    link.spawn(self._verify_in_place(frame, transfer, views, nbytes), release_slot=True)
                    return
                link.frame_done(frame, transfer, None)  # the transfer failed mid-frame
            else:
                buf = self._take_buffer(nbytes)
                try:
                    await link.conn.recv_into([memoryview(buf[:nbytes].numpy())])
                except BaseException:
                    self._staging.append(buf)
                    raise
                link.spawn(self._verify_staged(frame, transfer, buf), release_slot=True)
                return
        except BaseException:
            link.slots.release()
            raise
        link.slots.release()

    async def _verify_in_place(
        self, frame: TcpBlocks, transfer: IncomingTransfer, views: list[memoryview], nbytes: int
    ) -> None:
        crc = await self.link.run(crc32, views) if nbytes >= OFFLOAD_BYTES else crc32(views)
        error = None if crc == frame.crc else ChecksumMismatch(crc_message(frame, crc))
        self.link.frame_done(frame, transfer, error)

    async def _verify_staged(self, frame: TcpBlocks, transfer: IncomingTransfer, buf: torch.Tensor) -> None:
        try:
            await verify_and_scatter(self.link, frame, transfer, buf)
        finally:
            self._staging.append(buf)
