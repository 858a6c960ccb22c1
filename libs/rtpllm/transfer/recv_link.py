"""The receiving end of one connection from a sender (a "link").

It does the handshake (the one-time token of an expected transfer, layout check, backend
choice), then reads frames and checks each before any byte of it lands: transfer known
(opened with its token), open on this connection and not failed; layer and positions in
range; no (layer, position) twice. Only the pool blocks
`block_ids[dest_index : dest_index + count]` of the transfer are ever written. Landing
itself is the backend's job (tcp.py, shm.py, cuda_ipc.py); the link acks what landed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from rtpllm.transfer.backend import BlocksFrame, RecvPath
from rtpllm.transfer.cuda_ipc import IpcRecvPath
from rtpllm.transfer.errors import UNAVAILABLE, TransferAborted, TransferError, TransferRefused
from rtpllm.transfer.framing import (
    PROTOCOL_VERSION,
    Abort,
    Ack,
    ConnectionClosed,
    Done,
    Error,
    Finish,
    Frame,
    FrameConn,
    Hello,
    IpcBlocks,
    Open,
)
from rtpllm.transfer.layout import KVLayout
from rtpllm.transfer.shm import ShmRecvPath
from rtpllm.transfer.tcp import TcpRecvPath

if TYPE_CHECKING:
    from rtpllm.transfer.incoming import IncomingTransfer
    from rtpllm.transfer.receiver import KVReceiver

log = logging.getLogger(__name__)

RECV_PATHS: dict[str, type[RecvPath]] = {"tcp": TcpRecvPath, "shm": ShmRecvPath, "cuda_ipc": IpcRecvPath}
HANDSHAKE_TIMEOUT_S = 30.0
MAX_FRAME_BYTES = 256 << 20

T = TypeVar("T")


class RecvLink:
    """One connection from a sender (see the module docstring)."""

    def __init__(self, receiver: KVReceiver, conn: FrameConn) -> None:
        self.receiver = receiver
        self.conn = conn
        self.pool = receiver.pool
        self.path: RecvPath | None = None
        self.max_frame_bytes = 0
        self.slots = asyncio.Semaphore(receiver.max_pending_frames)
        self.closed = False
        self._transfers: dict[str, IncomingTransfer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sends: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        try:
            if await self._handshake():
                while True:
                    frame, plen = await self.conn.recv_frame()
                    await self._dispatch(frame, plen)
        except (ConnectionClosed, OSError, TimeoutError) as exc:
            log.debug("receiver link closed: %s", exc)
        except Exception:
            log.exception("receiver link failed")
        finally:
            self.closed = True
            for transfer in self._transfers.values():
                transfer.fail(
                    TransferAborted(f"connection from the sender of {transfer.transfer_id!r} was lost"),
                    notify=False,
                )
                transfer.quiesced()
            self.conn.close()
            if self._tasks:
                await asyncio.wait(list(self._tasks))
            if self._sends:
                await asyncio.wait(list(self._sends))
            if self.path is not None:
                self.path.close()
            self.conn.release()

    # -- used by backends ----------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker thread (checksums, copies)."""
        return await asyncio.get_running_loop().run_in_executor(self.receiver.executor, fn, *args)

    def push(self, frame: Frame) -> None:
        """Send a small frame without waiting (acks, errors, replies)."""
        task = asyncio.get_running_loop().create_task(self._send_quietly(frame))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def spawn(self, work: Coroutine[Any, Any, None], release_slot: bool = False) -> None:
        """Run the rest of a frame's landing as a task of this link."""
        task = asyncio.get_running_loop().create_task(self._guard(work, release_slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def read_into_pool(self, transfer: IncomingTransfer, views: Sequence[memoryview]) -> bool:
        """Read the payload straight into pool memory; False (rest of the payload dropped)
        if the transfer failed meanwhile."""
        read = asyncio.ensure_future(self.conn.recv_into(views))
        transfer.reading(read)
        try:
            await asyncio.wait([read])
        finally:
            transfer.reading(None)
            if not read.done():
                read.cancel()
        if read.cancelled():
            await self.conn.skip(self.conn.payload_left)
            return False
        read.result()
        return True

    def frame_done(self, frame: BlocksFrame, transfer: IncomingTransfer, error: TransferError | None) -> None:
        """A frame's blocks landed (or failed): ack it, or report why not."""
        if error is not None:
            transfer.fail(error, seq=frame.seq)
        elif transfer.active:
            first, num = self._layers(frame)
            # One layer (tcp, shm) or every layer (cuda_ipc).
            nbytes = (
                self.pool.payload_bytes(frame.count, first)
                if num == 1
                else frame.count * self.pool.block_bytes
            )
            transfer.mark_verified(first, num, frame.dest_index, frame.count, nbytes)
            self.push(Ack(frame.transfer_id, frame.seq))
        else:
            exc = transfer.failure
            code, message = (exc.code, str(exc)) if exc else ("refused", "transfer is over")
            self.push(Error(frame.transfer_id, code, message, frame.seq))

    # -- protocol ------------------------------------------------------------------------

    def _layers(self, frame: BlocksFrame) -> tuple[int, int]:
        if isinstance(frame, IpcBlocks):
            return 0, self.pool.layout.num_layers
        return frame.layer, 1

    async def _handshake(self) -> bool:
        frame, _ = await asyncio.wait_for(self.conn.recv_frame(), HANDSHAKE_TIMEOUT_S)
        receiver = self.receiver
        if not isinstance(frame, Hello):
            await self._refuse("", f"expected a Hello frame, got {type(frame).__name__}")
            return False
        if frame.v != PROTOCOL_VERSION:
            await self._refuse(
                "", f"data-plane protocol version {frame.v}, receiver speaks {PROTOCOL_VERSION}"
            )
            return False
        # Before anything else is checked or handed out (a shm ring, the pool's CUDA IPC
        # handle): the peer must hold the token of a transfer this receiver expects.
        refusal = receiver.admit(frame.transfer_id, frame.token)
        if refusal is not None:
            log.warning("data plane: refused a connection: %s", refusal.message)
            await self._refuse(frame.transfer_id, refusal.message, code=refusal.code)
            return False
        theirs = KVLayout(
            frame.namespace,
            frame.num_layers,
            frame.block_size,
            frame.num_kv_heads,
            frame.head_dim,
            frame.dtype,
            tuple(frame.layer_formats),
        )
        diff = theirs.mismatch(receiver.layout, "sender", "receiver")
        if diff:
            await self._refuse("", f"KV layout mismatch: {diff}")
            return False
        if frame.backend not in receiver.backends:
            await self._refuse(
                "", f"backend {frame.backend!r} not accepted; receiver accepts {receiver.backends}"
            )
            return False
        self.max_frame_bytes = min(frame.max_frame_bytes, MAX_FRAME_BYTES)
        if self.max_frame_bytes < self.pool.max_layer_bytes:
            await self._refuse(
                "", f"max frame of {frame.max_frame_bytes} bytes is smaller than one block layer"
            )
            return False
        path = RECV_PATHS[frame.backend](self)
        try:
            welcome = path.welcome()
        except Exception as exc:  # noqa: BLE001 -- e.g. /dev/shm full: the sender tries another backend
            path.close()
            await self._refuse(
                "", f"backend {frame.backend} unavailable on the receiver: {exc}", code=UNAVAILABLE
            )
            return False
        self.path = path
        await self.conn.send(welcome)
        return True

    async def _refuse(self, transfer_id: str, message: str, code: str = TransferRefused.code) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.conn.send(Error(transfer_id, code, message))

    async def _dispatch(self, frame: Frame, plen: int) -> None:
        assert self.path is not None
        if isinstance(frame, self.path.frame_type):
            await self._blocks(frame, plen)  # type: ignore[arg-type]
        elif isinstance(frame, Open):
            self._open(frame)
        elif isinstance(frame, Finish):
            await self._finish(frame)
        elif isinstance(frame, Abort):
            transfer = self._transfers.pop(frame.transfer_id, None)
            if transfer is not None:
                transfer.fail(
                    TransferAborted(f"sender aborted transfer {frame.transfer_id!r}: {frame.reason}"),
                    notify=False,
                )
                transfer.quiesced()
        else:
            raise ConnectionClosed(
                f"unexpected {type(frame).__name__} frame on a {self.path.name} connection"
            )

    def _open(self, frame: Open) -> None:
        assert self.path is not None
        tid = frame.transfer_id
        transfer = self.receiver.expected(tid)
        if transfer is None:
            self.push(self.receiver.refusal(tid))
            return
        problem = transfer.check_token(frame.token)
        if problem is not None:
            log.warning("data plane: refused to open transfer %r: %s", tid, problem)
            self.push(Error(tid, TransferRefused.code, f"transfer {tid!r}: {problem}"))
            return
        if transfer.state != "expected":
            self.push(
                Error(tid, TransferRefused.code, f"transfer {tid!r} is already open on another connection")
            )
            return
        if transfer.allow_fewer and 1 <= frame.num_blocks < transfer.num_blocks:
            transfer.shrink(frame.num_blocks)
        if frame.num_blocks != transfer.num_blocks:
            self.push(
                Error(
                    tid,
                    TransferRefused.code,
                    f"transfer {tid!r}: sender has {frame.num_blocks} blocks, receiver expects {transfer.num_blocks}",
                )
            )
            return
        # Used up only by an Open that succeeds: a refused one (a wrong block count) has
        # shown the token to nobody new, and the right sender may still come.
        transfer.use_token()
        transfer.bind(self, self.path.name)
        self._transfers[tid] = transfer
        try:
            opened = self.path.on_open(transfer)
        except Exception as exc:  # noqa: BLE001
            transfer.fail(TransferRefused(f"transfer {tid!r}: receiver could not open it: {exc}"))
            return
        self.push(opened)

    async def _blocks(self, frame: BlocksFrame, plen: int) -> None:
        assert self.path is not None
        tid = frame.transfer_id
        transfer = self._transfers.get(tid)
        if transfer is None or not transfer.active:
            await self.conn.skip(plen)
            if transfer is not None and transfer.failure is not None:
                exc = transfer.failure
                self.push(Error(tid, exc.code, str(exc), frame.seq))
            else:
                refusal = self.receiver.refusal(tid)
                refusal.seq = frame.seq
                self.push(refusal)
            return
        first, num = self._layers(frame)
        layers = self.pool.layout.num_layers
        if first < 0 or first + num > layers:  # before sizing its payload: layers differ in size
            problem = f"layers [{first}, {first + num}) outside [0, {layers})"
        elif plen != (expected := self.path.payload_bytes(frame)):
            problem = f"payload of {plen} bytes, expected {expected}"
        elif expected > self.max_frame_bytes:
            problem = f"payload of {expected} bytes over the {self.max_frame_bytes} byte frame limit"
        else:
            problem = transfer.claim(first, num, frame.dest_index, frame.count)
        if problem:
            await self.conn.skip(plen)
            transfer.fail(TransferRefused(f"transfer {tid!r}: {problem}"), seq=frame.seq)
            return
        await self.path.land(frame, transfer)

    async def _finish(self, frame: Finish) -> None:
        tid = frame.transfer_id
        transfer = self._transfers.get(tid)
        if transfer is None:
            self.push(self.receiver.refusal(tid))
            return
        if self._tasks:  # frames still landing (a well-behaved sender waited for their acks)
            await asyncio.wait(list(self._tasks))
        if transfer.active:
            transfer.fail(
                TransferRefused(
                    f"transfer {tid!r} finished with {transfer.blocks_received} of {transfer.num_blocks} blocks received"
                )
            )
        del self._transfers[tid]
        stats = transfer.stats
        if stats is not None:
            self.push(Done(tid, stats.num_blocks, stats.nbytes, stats.seconds))
        elif transfer.failure is not None:
            self.push(Error(tid, transfer.failure.code, str(transfer.failure)))

    async def _send_quietly(self, frame: Frame) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.conn.send(frame)

    async def _guard(self, work: Coroutine[Any, Any, None], release_slot: bool) -> None:
        try:
            await work
        except Exception as exc:  # noqa: BLE001 -- fail the transfer, keep the link
            log.exception("landing a frame failed")
            for transfer in list(self._transfers.values()):
                transfer.fail(TransferError(f"receiver failed to land a frame: {exc}"))
        finally:
            if release_slot:
                self.slots.release()
