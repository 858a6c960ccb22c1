"""The sending end of one connection to a receiver (a "link"): one transfer at a time.

It owns the socket and its reader task (acks, errors, replies), the frames in flight,
and the timeout: any wait for the receiver that makes no progress for `timeout_s`
raises TransferTimeout. A failure reported by the receiver fails the transfer; the link
then stops, confirms with `Abort` and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from rtpllm.transfer.backend import SendPath
from rtpllm.transfer.cuda_ipc import IpcSendPath
from rtpllm.transfer.errors import TransferAborted, TransferError, TransferTimeout, error_from_code
from rtpllm.transfer.framing import Abort, Ack, ConnectionClosed, Error, Frame, FrameConn
from rtpllm.transfer.shm import ShmSendPath
from rtpllm.transfer.tcp import TcpSendPath

if TYPE_CHECKING:
    from rtpllm.transfer.outgoing import OutgoingTransfer
    from rtpllm.transfer.sender import KVSender

log = logging.getLogger(__name__)

SEND_PATHS: dict[str, type[SendPath]] = {"tcp": TcpSendPath, "shm": ShmSendPath, "cuda_ipc": IpcSendPath}

T = TypeVar("T")
LinkKey = tuple[str, int, str]


def fresh(exc: TransferError) -> TransferError:
    """A new exception of the same kind (raising one instance repeatedly grows its traceback)."""
    return type(exc)(str(exc))


class SendLink:
    """One control connection to a receiver; carries one transfer at a time."""

    def __init__(self, sender: KVSender, conn: FrameConn, backend: str, key: LinkKey) -> None:
        self.sender = sender
        self.pool = sender.pool
        self.conn = conn
        self.backend = backend
        self.key = key
        self.max_frame_bytes = sender.max_frame_bytes
        self.prefetch = max(1, sender.threads)  # frames prepared ahead of the one being sent
        self.path = SEND_PATHS[backend](self)
        self.timeout_s = 30.0
        self.failure: TransferError | None = None
        self.current: OutgoingTransfer | None = None
        self.closed = False
        self._reply: asyncio.Future[Frame] | None = None
        self._unacked: dict[int, Callable[[], None] | None] = {}
        self._seq = 0
        self._changed = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    # -- used by backends ----------------------------------------------------------------

    @property
    def blocks_per_frame(self) -> int:
        return max(1, self.max_frame_bytes // self.pool.max_layer_bytes)

    def limit_frame_bytes(self, nbytes: int) -> None:
        self.max_frame_bytes = min(self.max_frame_bytes, nbytes)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def track(self, seq: int, on_settled: Callable[[], None] | None = None) -> None:
        """Frame `seq` awaits its ack; `on_settled` runs when it is acked or refused."""
        self._unacked[seq] = on_settled

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    def check(self) -> None:
        """Raise the transfer's failure, if any."""
        if self.failure is not None:
            raise fresh(self.failure)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`fn(*args)` on a worker thread (gathers, checksums, device copies). The future
        completes only when the thread is done (a thread cannot be cancelled): await it
        through `asyncio.shield`, as `run` does. `drain()` waits for all of them."""
        fut = asyncio.get_running_loop().run_in_executor(self.sender.executor, fn, *args)
        self._inflight.add(fut)
        fut.add_done_callback(self._work_done)
        return fut

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`await` of `submit(fn, *args)`; cancelling the caller leaves the work running."""
        return await asyncio.shield(self.submit(fn, *args))

    async def drain(self) -> None:
        """Wait until no worker thread works for this link any more."""
        while self._inflight:
            await asyncio.wait(list(self._inflight))

    async def send_frame(self, frame: Frame, payload: Sequence[memoryview] = ()) -> None:
        """Send a frame; TransferTimeout if the receiver takes no data for timeout_s."""
        try:
            await asyncio.wait_for(self.conn.send(frame, payload), self.timeout_s)
        except TimeoutError:
            self._give_up(TransferTimeout(f"receiver took no data for {self.timeout_s:g} s"))
        except (ConnectionError, OSError) as exc:
            self.fail(TransferAborted(f"connection to the receiver lost: {exc}"))
            self.check()

    async def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        """Wait for `ready()`; TransferTimeout if nothing arrives for timeout_s."""
        while True:
            self.check()
            if ready():
                return
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), self.timeout_s)
            except TimeoutError:
                self._give_up(TransferTimeout(f"no {what} from the receiver within {self.timeout_s:g} s"))

    # -- used by the sender --------------------------------------------------------------

    async def request(self, frame: Frame, timeout_s: float) -> Frame:
        """Send `frame` and return the receiver's reply (possibly an Error frame)."""
        reply = self._reply = asyncio.get_running_loop().create_future()
        try:
            await self.send_frame(frame)
            try:
                return await asyncio.wait_for(asyncio.shield(reply), timeout_s)
            except TimeoutError:
                self._give_up(TransferTimeout(f"no answer to {type(frame).__name__} within {timeout_s:g} s"))
                raise  # unreachable: _give_up raises
        finally:
            self._reply = None
            if not reply.done():
                reply.cancel()

    def fail(self, exc: TransferError) -> None:
        """The current transfer failed: wake everything waiting on this link."""
        if self.failure is None:
            self.failure = exc
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(fresh(exc))
        self._poke()

    def close(self) -> None:
        self.closed = True
        self.conn.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._reader, return_exceptions=True)

    # -- internals -----------------------------------------------------------------------

    def _give_up(self, exc: TransferError) -> None:
        self.fail(exc)
        self.close()
        raise fresh(exc)

    def _work_done(self, fut: asyncio.Future[Any]) -> None:
        self._inflight.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved: the awaiting caller may have gone

    def _poke(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _settle(self, seq: int) -> None:
        if seq in self._unacked:
            on_settled = self._unacked.pop(seq)
            if on_settled is not None:
                on_settled()
        self._poke()

    async def _read_loop(self) -> None:
        try:
            while True:
                frame, _ = await self.conn.recv_frame()
                if isinstance(frame, Ack):
                    self._settle(frame.seq)
                elif isinstance(frame, Error):
                    self._on_error(frame)
                elif self._reply is not None and not self._reply.done():
                    self._reply.set_result(frame)
                else:
                    log.warning("unexpected %s frame from the receiver", type(frame).__name__)
        except (ConnectionClosed, OSError) as exc:
            log.debug("sender link closed: %s", exc)
        finally:
            self.closed = True
            self.fail(TransferAborted("connection to the receiver was lost"))
            self.conn.release()
            self.sender.forget_link(self)
            await self.drain()  # a worker thread may still write what close() releases
            self.path.close()

    def _on_error(self, frame: Error) -> None:
        if frame.seq >= 0:
            self._settle(frame.seq)
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(frame)
        current = self.current
        if current is not None and frame.transfer_id == current.transfer_id and self.failure is None:
            self.fail(error_from_code(frame.code, frame.message))
            # The receiver gave up on the transfer: stop, confirm (a cuda_ipc receiver
            # waits for that before reusing the blocks), and drop the connection.
            self._stopping = asyncio.get_running_loop().create_task(self._stop(current))

    async def _stop(self, transfer: OutgoingTransfer) -> None:
        async with transfer.lock:
            await self.path.quiesce()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.conn.send(Abort(transfer.transfer_id, "stopped after the receiver's error")), 5.0
                )
        self.close()
