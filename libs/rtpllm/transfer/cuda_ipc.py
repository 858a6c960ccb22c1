"""cuda_ipc backend (same host, both pools on CUDA): the sender copies blocks straight
into the receiver's pool, device to device; only a descriptor travels.

At the handshake the receiver shares its pool tensor through CUDA IPC (the fields of
`torch.multiprocessing.reductions.reduce_tensor`, rebuilt on the sender with
`rebuild_cuda_tensor`: the same calls torch.multiprocessing makes, stable across torch
2.x). A mixed per-layer pool (`LayerPoolBlocks`) shares its one byte buffer instead,
with where each layer's pages start in it; the sender views the layers' pages there
with its own pages' shapes (the handshake checked both ends have the same per-layer
formats) and the receiver's block count. At `Open` it sends the transfer's target block ids and an IPC event recorded on its
current stream, after which the blocks are free to overwrite. The sender copies layer by
layer on a side stream that waits for that event and for its own engine's stream,
synchronises, and sends `IpcBlocks` with a position-weighted checksum (checksum.py) of
what it copied; the receiver recomputes it over its blocks on its GPU and acks.

Writes are one-sided, so a receiver that fails such a transfer (lease, cancel) waits for
the sender to confirm it has stopped (its `Abort`, sent after synchronising) or for the
connection to close before `wait()` raises and the blocks may be reused.
CUDA IPC needs two processes: a process cannot open its own IPC handles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from rtpllm.transfer import faults
from rtpllm.transfer.backend import BackendUnavailable, RecvPath, SendPath
from rtpllm.transfer.checksum import WeightedSum
from rtpllm.transfer.errors import ChecksumMismatch, TransferAborted
from rtpllm.transfer.framing import IpcBlocks, IpcPoolHandle, Opened, Welcome
from rtpllm.transfer.layout import dtype_name

if TYPE_CHECKING:
    from rtpllm.transfer.blocks import KVBlocks
    from rtpllm.transfer.incoming import IncomingTransfer
    from rtpllm.transfer.outgoing import OutgoingTransfer
    from rtpllm.transfer.send_link import SendLink


def share_pool(kv: torch.Tensor, layer_offsets: Sequence[int] = (), num_blocks: int = 0) -> IpcPoolHandle:
    """The receiver's pool as an IPC handle (reduce_tensor's fields that go on the wire).
    `layer_offsets`, `num_blocks`: a mixed pool's layer pages in `kv`, its byte buffer."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(kv)
    (_, size, stride, offset, _, _, device, handle, storage_bytes, storage_offset,
     _, ref_handle, ref_offset, event_handle, event_sync) = args  # fmt: skip
    return IpcPoolHandle(
        device=int(device),
        handle=bytes(handle),
        storage_bytes=int(storage_bytes),
        storage_offset_bytes=int(storage_offset),
        ref_counter_handle=bytes(ref_handle),
        ref_counter_offset=int(ref_offset),
        event_handle=bytes(event_handle) if event_handle else b"",
        event_sync_required=bool(event_sync),
        shape=list(size),
        stride=list(stride),
        offset=int(offset),
        dtype=dtype_name(kv.dtype),
        layer_offsets=list(layer_offsets),
        num_blocks=num_blocks,
    )


def open_pool(h: IpcPoolHandle) -> torch.Tensor:
    """Map a shared pool into this process (fails in the process that shared it)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(h.shape), tuple(h.stride), h.offset, torch.storage.TypedStorage,
        getattr(torch, h.dtype), h.device, h.handle, h.storage_bytes, h.storage_offset_bytes, False,
        h.ref_counter_handle, h.ref_counter_offset, h.event_handle or None, h.event_sync_required,
    )  # fmt: skip


def remote_pages(remote: torch.Tensor, h: IpcPoolHandle, pool: KVBlocks) -> tuple[list[torch.Tensor], int]:
    """The receiver's layer pages [2, its blocks, ...] in its shared tensor `remote`, and
    its number of blocks; BackendUnavailable unless they are pages of `pool`'s layout."""
    local: list[torch.Tensor] = pool.pages  # type: ignore[attr-defined]
    if bool(h.layer_offsets) != pool.layout.mixed:
        raise BackendUnavailable("one end shares a pool tensor, the other a mixed pool's layer pages")
    if not h.layer_offsets:
        if remote.dim() != 6 or remote.shape[:2] != (len(local), 2) or remote.shape[3:] != local[0].shape[2:]:
            raise BackendUnavailable(
                f"receiver pool shape {tuple(remote.shape)} does not match [{len(local)}, 2, blocks, "
                f"{', '.join(map(str, local[0].shape[2:]))}]"
            )
        return [remote[layer] for layer in range(len(local))], remote.shape[2]
    size = remote.numel() * remote.element_size()
    if len(h.layer_offsets) != len(local) or h.num_blocks < 1 or remote.dtype != torch.uint8:
        raise BackendUnavailable(f"receiver shared {len(h.layer_offsets)} layers of {h.num_blocks} blocks")
    pages = []
    for layer, (offset, page) in enumerate(zip(h.layer_offsets, local, strict=True)):
        shape = (2, h.num_blocks, *page.shape[2:])
        nbytes = page.element_size() * shape[0] * shape[1] * page[0, 0].numel()
        if offset < 0 or offset % page.element_size() or offset + nbytes > size:
            raise BackendUnavailable(
                f"receiver's layer {layer} ({nbytes} bytes at {offset}) is outside its buffer"
            )
        pages.append(remote[offset : offset + nbytes].view(page.dtype).view(shape))
    return pages, h.num_blocks


class IpcSendPath(SendPath):
    name = "cuda_ipc"

    def __init__(self, link: SendLink) -> None:
        super().__init__(link)
        # The receiver's layer pages: views of its shared memory, which they keep open.
        self._remote_pages: list[torch.Tensor] = []
        self._remote_blocks = 0
        self._remote_stream: torch.cuda.Stream | None = None
        self._dest_ids: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None

    async def setup(self, welcome: Welcome) -> None:
        pool = self.link.pool
        if welcome.ipc_pool is None or not pool.is_cuda:
            raise BackendUnavailable("cuda_ipc needs CUDA pools on both sides")
        try:
            remote = open_pool(welcome.ipc_pool)
        except Exception as exc:  # noqa: BLE001 -- any failure means: use another backend
            raise BackendUnavailable(f"cannot open the receiver's pool over CUDA IPC: {exc}") from exc
        self._remote_pages, self._remote_blocks = remote_pages(remote, welcome.ipc_pool, pool)
        if remote.device != pool.device:
            self._remote_stream = torch.cuda.Stream(remote.device)

    def on_opened(self, opened: Opened, transfer: OutgoingTransfer) -> None:
        assert self._remote_pages
        ids = np.asarray(opened.block_ids, dtype=np.int64)
        if len(ids) != transfer.num_blocks or (
            len(ids) and (ids.min() < 0 or ids.max() >= self._remote_blocks)
        ):
            raise BackendUnavailable("receiver sent invalid block ids")
        self._dest_ids = torch.from_numpy(ids)  # host tensor; each copy uploads its slice
        self._ready = (
            torch.cuda.Event.from_ipc_handle(self._remote_pages[0].device, opened.ipc_event)
            if opened.ipc_event
            else None
        )

    def _copy(
        self,
        remote: list[torch.Tensor],
        dest_ids: torch.Tensor,
        src_ids: np.ndarray,
        dest_index: int,
        corrupt: bool,
    ) -> int:
        pool, ready, other = self.link.pool, self._ready, self._remote_stream
        assert pool.stream is not None
        # Same device: everything on the pool's side stream. Another device (peer access):
        # its side stream is made current too, so the cross-device copy and the writes
        # there are ordered on our streams, not on that device's default stream.
        streams = [pool.stream] if other is None else [pool.stream, other]
        with torch.cuda.device(pool.device), torch.cuda.stream(pool.stream):
            with torch.cuda.stream(other) if other is not None else contextlib.nullcontext():
                if ready is not None:
                    # Only the writes into the receiver's blocks wait for it: on the
                    # stream of the receiver's device (a wait from another device's
                    # stream on an IPC event crashes torch 2.11).
                    streams[-1].wait_event(ready)
                device = remote[0].device
                dst = dest_ids[dest_index : dest_index + len(src_ids)].to(device, non_blocking=True)
                src = torch.from_numpy(src_ids).to(pool.device, non_blocking=True)
                checksum = WeightedSum(pool.device)
                # Layer by layer: the pool tensor's layers, or a mixed pool's layer pages.
                for page, remote_page in zip(pool.pages, remote, strict=True):
                    blocks = page.index_select(1, src)
                    checksum.update(blocks)
                    remote_page.index_copy_(1, dst, blocks.to(device, non_blocking=True))
                events = []
                for s in streams:
                    events.append(torch.cuda.Event())
                    events[-1].record(s)
        for e in events:
            e.synchronize()
        value = checksum.value()
        return value ^ 1 if corrupt else value

    async def send(self, transfer: OutgoingTransfer, src_ids: np.ndarray, dest_index: int) -> int:
        link, pool = self.link, self.link.pool
        remote, dest_ids = self._remote_pages, self._dest_ids
        if not remote or dest_ids is None:  # the connection closed meanwhile
            link.check()
            raise TransferAborted("connection to the receiver was closed")
        pool.follow_engine()
        shipped = 0
        # One descriptor per group of blocks: the receiver verifies and acks group by group.
        step = max(link.blocks_per_frame, 1)
        for start in range(0, len(src_ids), step):
            ids = src_ids[start : start + step]
            link.check()
            checksum = await link.run(
                self._copy, remote, dest_ids, ids, dest_index + start, faults.take_corruption()
            )
            seq = link.next_seq()
            link.track(seq)
            await link.send_frame(
                IpcBlocks(transfer.transfer_id, seq, dest_index + start, len(ids), checksum)
            )
            shipped += len(ids) * pool.block_bytes
        return shipped

    async def quiesce(self) -> None:
        # Every _copy synchronises its streams before it returns: once no worker thread
        # runs one (a cancelled send() leaves it running), nothing writes remote memory.
        await self.link.drain()

    def close(self) -> None:
        self._remote_pages = []
        self._dest_ids = None
        self._ready = None


class IpcRecvPath(RecvPath):
    name = "cuda_ipc"
    frame_type = IpcBlocks

    def welcome(self) -> Welcome:
        pool = self.link.pool
        shared, offsets = pool.ipc_tensor()  # type: ignore[attr-defined]  # direct pools only
        return Welcome("cuda_ipc", ipc_pool=share_pool(shared, offsets, pool.num_blocks if offsets else 0))

    def on_open(self, transfer: IncomingTransfer) -> Opened:
        pool = self.link.pool
        event = torch.cuda.Event(interprocess=True)
        event.record(torch.cuda.current_stream(pool.device))
        transfer.hold(event, one_sided_writes=True)
        return Opened(
            transfer.transfer_id, block_ids=transfer.block_ids.tolist(), ipc_event=bytes(event.ipc_handle())
        )

    def _checksum(self, ids: np.ndarray) -> int:
        pool = self.link.pool
        with torch.cuda.device(pool.device), torch.cuda.stream(pool.stream):
            idx = pool.ids_tensor(ids)
            checksum = WeightedSum(pool.device)
            for page in pool.pages:
                checksum.update(page.index_select(1, idx))
            return checksum.value()

    async def land(self, frame: IpcBlocks, transfer: IncomingTransfer) -> None:
        await self.link.slots.acquire()
        self.link.spawn(self._verify(frame, transfer), release_slot=True)

    async def _verify(self, frame: IpcBlocks, transfer: IncomingTransfer) -> None:
        ids = transfer.block_ids[frame.dest_index : frame.dest_index + frame.count]
        got = await self.link.run(self._checksum, ids)
        error = None
        if got != frame.checksum:
            error = ChecksumMismatch(
                f"checksum mismatch in transfer {frame.transfer_id!r}, positions [{frame.dest_index}, "
                f"{frame.dest_index + frame.count}): sender {frame.checksum:#x}, receiver {got:#x}"
            )
        self.link.frame_done(frame, transfer, error)
