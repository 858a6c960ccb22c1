"""The data plane's wire format and the framed socket both ends speak.

A frame is `<u32 header length><u64 payload length>`, a msgpack header (one of the
tagged Structs below) and `payload length` raw bytes (only TcpBlocks has a payload).
The payload length sits outside the header so a receiver can always skip a payload it
refuses, keeping the stream in step.

One TCP connection carries one transfer at a time (`Hello` once, then any number of
`Open` ... `Finish`/`Abort` rounds); every frame names its transfer id so a stale frame
is refused rather than misapplied.

Nothing is accepted without a one-time token: `KVReceiver.expect()` issues a random
128-bit token per transfer, which reaches the sender over the authenticated control
plane (NATS). `Hello` names a transfer the receiver expects and its token (checked, not
used up: no pool handle or shm ring is handed to a peer that holds none), and `Open`
presents the token again, which uses it up: a replay is refused.

    sender                          receiver
    Hello(layout, backend, transfer_id, token)  ->
                              <-    Welcome(backend params) | Error
    Open(transfer_id, n, token)  ->
                              <-    Opened(...) | Error("refused")
    TcpBlocks/ShmBlocks/IpcBlocks ...  ->          (pipelined, no waiting)
                              <-    Ack(seq) ... | Error(code)   (once verified and landed)
    Finish                    ->
                              <-    Done(stats) | Error
    Abort(reason)             ->    (any time; no reply)
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Sequence

import msgspec

PROTOCOL_VERSION = 1
PREFIX = struct.Struct("<IQ")
MAX_HEADER_BYTES = 1 << 20


class Hello(msgspec.Struct, tag="hello", array_like=True):
    v: int
    backend: str
    host_id: str
    namespace: bytes
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    max_frame_bytes: int
    # The first transfer this connection is opened for, and its token (checked at the
    # handshake, used up by its Open). Defaults: a peer without one is refused.
    transfer_id: str = ""
    token: bytes = b""
    # A mixed per-layer KV pool: each layer's stored format (KVLayout.layer_formats);
    # empty for a uniform pool (so a uniform Hello is what it always was, plus []).
    layer_formats: list[str] = []


class IpcPoolHandle(msgspec.Struct, array_like=True):
    """A CUDA pool shared through CUDA IPC (`torch.UntypedStorage._share_cuda_()` fields)."""

    device: int
    handle: bytes
    storage_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    shape: list[int]
    stride: list[int]
    offset: int
    dtype: str
    # A mixed per-layer pool: the shared tensor is its byte buffer, layer i's pages
    # [2, num_blocks, ...] start `layer_offsets[i]` bytes into it; empty for a pool tensor.
    layer_offsets: list[int] = []
    num_blocks: int = 0


class Welcome(msgspec.Struct, tag="welcome", array_like=True):
    backend: str
    shm_path: str = ""
    shm_slots: int = 0
    shm_slot_bytes: int = 0
    ipc_pool: IpcPoolHandle | None = None


class Open(msgspec.Struct, tag="open", array_like=True):
    transfer_id: str
    num_blocks: int
    token: bytes = b""  # the transfer's one-time token (KVReceiver.expect); used up here


class Opened(msgspec.Struct, tag="opened", array_like=True):
    transfer_id: str
    # cuda_ipc only: the sender writes the receiver's pool itself, so it needs the target
    # block ids, and an IPC event recorded after the receiver's last use of those blocks.
    block_ids: list[int] = []
    ipc_event: bytes = b""


class TcpBlocks(msgspec.Struct, tag="tcp", array_like=True):
    """Layer `layer` of positions [dest_index, dest_index + count); payload follows:
    [2 (K, V), count, block_size, kv_heads, head_dim] in the pool's dtype (a mixed
    pool: the layer's pages, `KVLayout.layer_bytes(layer)` per block)."""

    transfer_id: str
    seq: int
    layer: int
    dest_index: int
    count: int
    crc: int


class ShmBlocks(msgspec.Struct, tag="shm", array_like=True):
    """As TcpBlocks, with the payload in slot `slot` of the shared ring instead."""

    transfer_id: str
    seq: int
    layer: int
    dest_index: int
    count: int
    crc: int
    slot: int


class IpcBlocks(msgspec.Struct, tag="ipc", array_like=True):
    """All layers of positions [dest_index, dest_index + count) are already in the
    receiver's pool (written by the sender over CUDA IPC and synchronised)."""

    transfer_id: str
    seq: int
    dest_index: int
    count: int
    checksum: int


class Ack(msgspec.Struct, tag="ack", array_like=True):
    transfer_id: str
    seq: int


class Finish(msgspec.Struct, tag="finish", array_like=True):
    transfer_id: str


class Done(msgspec.Struct, tag="done", array_like=True):
    transfer_id: str
    num_blocks: int
    nbytes: int
    seconds: float


class Abort(msgspec.Struct, tag="abort", array_like=True):
    transfer_id: str
    reason: str


class Error(msgspec.Struct, tag="error", array_like=True):
    """`code` is a TransferError code (errors.py); `seq` the refused frame, -1 if none."""

    transfer_id: str
    code: str
    message: str
    seq: int = -1


Frame = (
    Hello | Welcome | Open | Opened | TcpBlocks | ShmBlocks | IpcBlocks | Ack | Finish | Done | Abort | Error
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (or it broke)."""


class FrameConn:
    """Frames over one non-blocking socket, without copies: scatter/gather system calls
    (`sendmsg` from the caller's buffers, `recvmsg_into` straight into the caller's
    buffers, e.g. pool blocks anywhere in the pool), waiting for readiness on the event
    loop. Writes are serialised by a lock; reads must come from one task.

    Reads happen in the reading task's own steps, after it was woken: a read cancelled
    while it waits never touches its buffers (receiver.py relies on this)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._wlock = asyncio.Lock()
        self._prefix = bytearray(PREFIX.size)
        self._scratch = memoryview(bytearray(1 << 20))
        self._waiters: set[asyncio.Future[None]] = set()
        self._released = False
        self.payload_left = 0  # bytes of the current frame's payload not read yet
        self.closed = False

    @classmethod
    async def connect(cls, host: str, port: int) -> FrameConn:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, frame: Frame, payload: Sequence[memoryview] = ()) -> None:
        """Send one frame; `payload` (1-D byte memoryviews) goes out in order, uncopied."""
        header = _encoder.encode(frame)
        size = sum(p.nbytes for p in payload)
        bufs = [memoryview(PREFIX.pack(len(header), size) + header), *payload]
        async with self._wlock:
            if self.closed:
                raise ConnectionClosed("connection closed")
            try:
                await self._send_all(bufs)
            except BaseException:
                # A frame cut in the middle leaves the stream unusable.
                self.close()
                raise

    async def recv_frame(self) -> tuple[Frame, int]:
        """The next frame's header and its payload length (read the payload next, with
        `recv_into` or `skip`; an unread payload is skipped by the next call)."""
        if self.payload_left:
            await self.skip(self.payload_left)
        await self._recv([memoryview(self._prefix)], payload=False)
        hlen, plen = PREFIX.unpack(self._prefix)
        if hlen > MAX_HEADER_BYTES:
            raise ConnectionClosed(f"frame header of {hlen} bytes: not a data-plane peer")
        header = bytearray(hlen)
        await self._recv([memoryview(header)], payload=False)
        try:
            frame = _decoder.decode(header)
        except msgspec.DecodeError as exc:
            raise ConnectionClosed(f"undecodable frame: {exc}") from exc
        self.payload_left = plen
        return frame, plen

    async def recv_into(self, targets: Sequence[memoryview]) -> None:
        """Read the next bytes of the current payload into `targets` (1-D byte
        memoryviews), in order. If cancelled, `payload_left` tells how much is left."""
        if sum(t.nbytes for t in targets) > self.payload_left:
            raise ConnectionClosed("payload shorter than its header says")
        await self._recv(list(targets), payload=True)

    async def skip(self, n: int) -> None:
        """Read and drop `n` bytes of the current payload."""
        while n > 0:
            k = min(n, self._scratch.nbytes)
            await self._recv([self._scratch[:k]], payload=True)
            n -= k

    def close(self) -> None:
        """Stop the connection: pending reads see end-of-stream, pending writes fail.
        The owner of the read loop calls `release()` once that loop has ended."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def release(self) -> None:
        """Close the socket for good (fails anything still waiting on it)."""
        self.close()
        if self._released:
            return
        self._released = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionClosed("connection closed"))
        self.sock.close()

    # -- internals -----------------------------------------------------------------------

    async def _wait(self, writable: bool) -> None:
        if self._released:
            raise ConnectionClosed("connection closed")
        loop = self._loop
        waiter: asyncio.Future[None] = loop.create_future()
        if writable:
            loop.add_writer(self._fd, _wake, waiter)
        else:
            loop.add_reader(self._fd, _wake, waiter)
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            if not self._released:
                (loop.remove_writer if writable else loop.remove_reader)(self._fd)

    async def _send_all(self, bufs: list[memoryview]) -> None:
        bufs = [b for b in bufs if b.nbytes]
        i = 0
        while i < len(bufs):
            try:
                n = self.sock.sendmsg(bufs[i : i + _IOV_MAX])
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)
                continue
            i = _advance(bufs, i, n)

    async def _recv(self, bufs: list[memoryview], payload: bool) -> None:
        bufs = [b for b in bufs if b.nbytes]  # recv of 0 bytes would read as end-of-stream
        i, reads = 0, 0
        while i < len(bufs):
            try:
                if len(bufs) - i == 1:
                    n = self.sock.recv_into(bufs[i])
                else:
                    n = self.sock.recvmsg_into(bufs[i : i + _IOV_MAX])[0]
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            if n == 0:
                raise ConnectionClosed("connection closed by peer")
            if payload:
                self.payload_left -= n
            i = _advance(bufs, i, n)
            reads += 1
            if reads % 64 == 0:  # a stream that never runs dry must not starve the loop
                await asyncio.sleep(0)


_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _advance(bufs: list[memoryview], i: int, n: int) -> int:
    """Consume `n` bytes from bufs[i:]; returns the index of the first unfinished buffer."""
    while n and i < len(bufs):
        size = bufs[i].nbytes
        if n >= size:
            n -= size
            i += 1
        else:
            bufs[i] = bufs[i][n:]
            n = 0
    while i < len(bufs) and bufs[i].nbytes == 0:
        i += 1
    return i
