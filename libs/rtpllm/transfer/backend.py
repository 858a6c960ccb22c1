"""The transfer-backend interface: how the bytes of a payload get from one pool to the other.

Every backend has a sending and a receiving half, each bound to one control connection
(a "link"). The links (sender.py, receiver.py) own the socket, the handshake, acks,
leases and failures; a backend only moves and verifies bytes:

- tcp.py: payloads travel inline on the control connection.
- shm.py: payloads go through a shared-memory ring; only descriptors travel.
- cuda_ipc.py: the sender writes the receiver's pool directly (CUDA IPC); only a
  descriptor with a GPU-computed checksum travels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from rtpllm.transfer.checksum import crc32
from rtpllm.transfer.errors import ChecksumMismatch
from rtpllm.transfer.framing import IpcBlocks, Opened, ShmBlocks, TcpBlocks, Welcome

if TYPE_CHECKING:
    from rtpllm.transfer.incoming import IncomingTransfer
    from rtpllm.transfer.outgoing import OutgoingTransfer
    from rtpllm.transfer.recv_link import RecvLink
    from rtpllm.transfer.send_link import SendLink

BlocksFrame = TcpBlocks | ShmBlocks | IpcBlocks


class BackendUnavailable(Exception):
    """This backend cannot run between these two processes (e.g. the shm ring or the
    IPC handle cannot be opened); the sender tries its next preferred backend."""


def plan_frames(
    ids: np.ndarray, dest_index: int, num_layers: int, per_frame: int
) -> Iterator[tuple[np.ndarray, int, int]]:
    """(block ids, first destination position, layer) of each frame of one send():
    groups of at most `per_frame` blocks, each group layer by layer, so a group's blocks
    are complete at the receiver before the next group starts."""
    for start in range(0, len(ids), per_frame):
        chunk = ids[start : start + per_frame]
        for layer in range(num_layers):
            yield chunk, dest_index + start, layer


class SendPath(ABC):
    """Sending half of a backend, bound to one link."""

    name: ClassVar[str]

    def __init__(self, link: SendLink) -> None:
        self.link = link

    async def setup(self, welcome: Welcome) -> None:  # noqa: B027 -- optional hook
        """After the handshake: attach what the receiver offered (BackendUnavailable if
        that fails)."""

    def on_opened(self, opened: Opened, transfer: OutgoingTransfer) -> None:  # noqa: B027 -- optional hook
        """A transfer opened on this link."""

    @abstractmethod
    async def send(self, transfer: OutgoingTransfer, src_ids: np.ndarray, dest_index: int) -> int:
        """Ship pool blocks `src_ids` to positions dest_index... of the transfer; returns
        once the source blocks may change again. Returns the payload bytes shipped."""

    async def quiesce(self) -> None:  # noqa: B027 -- optional hook
        """Return once nothing this side started can still write the receiver's memory."""

    def close(self) -> None:  # noqa: B027 -- optional hook
        """Release what setup() attached."""


class RecvPath(ABC):
    """Receiving half of a backend, bound to one link."""

    name: ClassVar[str]
    frame_type: ClassVar[type]

    def __init__(self, link: RecvLink) -> None:
        self.link = link

    @abstractmethod
    def welcome(self) -> Welcome:
        """The handshake answer (creates what the sender will attach)."""

    def on_open(self, transfer: IncomingTransfer) -> Opened:
        return Opened(transfer.transfer_id)

    def payload_bytes(self, frame: BlocksFrame) -> int:
        """How many payload bytes follow this frame on the connection."""
        return 0

    @abstractmethod
    async def land(self, frame: BlocksFrame, transfer: IncomingTransfer) -> None:
        """Get a validated frame's blocks into the pool, then `link.frame_done(...)`.
        May return before that (the work goes on in a task of the link)."""

    def close(self) -> None:  # noqa: B027 -- optional hook
        """Release what welcome() created."""


async def verify_and_scatter(
    link: RecvLink, frame: TcpBlocks | ShmBlocks, transfer: IncomingTransfer, src: torch.Tensor
) -> None:
    """tcp (staged) and shm: check the CRC of a payload in host buffer `src`, then
    write it into the transfer's blocks. Corrupt data never reaches the pool."""
    pool = link.pool
    nbytes = pool.payload_bytes(frame.count, frame.layer)
    crc = await link.run(crc32, [memoryview(src[:nbytes].numpy())])
    if crc != frame.crc:
        link.frame_done(frame, transfer, ChecksumMismatch(crc_message(frame, crc)))
        return
    if transfer.begin_write():
        try:
            ids = transfer.block_ids[frame.dest_index : frame.dest_index + frame.count]
            await link.run(pool.scatter, frame.layer, ids, src, transfer.ready_event)
        finally:
            transfer.end_write()
    link.frame_done(frame, transfer, None)


def crc_message(frame: TcpBlocks | ShmBlocks, got: int) -> str:
    return (
        f"checksum mismatch in transfer {frame.transfer_id!r}, layer {frame.layer}, positions "
        f"[{frame.dest_index}, {frame.dest_index + frame.count}): crc32 sent {frame.crc:#010x}, received {got:#010x}"
    )
