"""One transfer into a receiver's pool, as the receiving side tracks it.

Which (layer, position) pairs are claimed by a frame and which are verified, the lease,
and failure. The safety rule lives here: once `wait()` has returned or raised, nothing
writes the transfer's blocks any more (see `fail`), so the decode side may free them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rtpllm.transfer.errors import TransferAborted, TransferError, TransferTimeout
from rtpllm.transfer.framing import Error
from rtpllm.transfer.stats import TransferStats

if TYPE_CHECKING:
    from rtpllm.transfer.receiver import KVReceiver
    from rtpllm.transfer.recv_link import RecvLink

log = logging.getLogger(__name__)

# How long a failed cuda_ipc transfer waits for its sender to confirm it stopped writing.
QUIESCE_TIMEOUT_S = 10.0


class IncomingTransfer:
    """One expected transfer into this receiver's pool (see `KVReceiver.expect`)."""

    def __init__(
        self, receiver: KVReceiver, transfer_id: str, block_ids: np.ndarray, lease_s: float,
        ready_event: torch.cuda.Event | None, token: bytes, allow_fewer: bool = False,
    ) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        self.transfer_id = transfer_id
        # The one-time token a sender must present (receiver.expect issued it); None
        # once an Open has used it, so a replay finds nothing to match.
        self._token: bytes | None = token
        self.block_ids = block_ids
        self.num_blocks = len(block_ids)
        self.lease_s = lease_s
        self.allow_fewer = allow_fewer  # the sender may open it with a leading part only
        self.ready_event = ready_event  # CUDA: writes wait for the blocks' previous users
        self.backend = ""
        layers = receiver.layout.num_layers
        self._receiver = receiver
        self._claimed = np.zeros((layers, self.num_blocks), dtype=bool)
        self._verified = np.zeros((layers, self.num_blocks), dtype=bool)
        self._state = "expected"  # -> "open" -> "done" | "failed"
        self._exc: TransferError | None = None
        self._stats: TransferStats | None = None
        self._future: asyncio.Future[TransferStats] = loop.create_future()
        self._future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        self._inflight = 0
        self._reading: asyncio.Future[Any] | None = None
        self._link: RecvLink | None = None
        self._one_sided = False
        self._quiesced = True
        self._quiesce_timer: asyncio.TimerHandle | None = None
        self._held: list[object] = []
        self._nbytes = 0
        self._t_open = time.perf_counter()
        self._lease = loop.call_later(lease_s, self._lease_expired)

    # -- public ------------------------------------------------------------------------

    @property
    def blocks_received(self) -> int:
        """Positions whose every layer has landed and been verified."""
        return int(self._verified.all(axis=0).sum())

    @property
    def state(self) -> str:
        """ "expected" (no sender yet), "open", "done" or "failed"."""
        return self._state

    @property
    def active(self) -> bool:
        return self._state in ("expected", "open")

    @property
    def token(self) -> bytes:
        """The one-time token to hand the sender over the control plane (NATS), next to
        the endpoint and the transfer id; b"" once a sender has used it."""
        return self._token or b""

    async def wait(self) -> TransferStats:
        """Return once every block is in the pool, checksums verified (CUDA: complete on
        the device, so visible to any later work). Raises TransferTimeout (lease ran
        out), TransferAborted (sender aborted, connection dropped, cancel()),
        TransferRefused (bad frames) or ChecksumMismatch -- only once no write into the
        blocks can happen any more, so they may be freed right after."""
        return await asyncio.shield(self._future)

    def cancel(self) -> None:
        """Stop accepting frames for this transfer; the sender gets an error and `wait()`
        raises TransferAborted (free the blocks after that, not before)."""
        self.fail(TransferAborted(f"transfer {self.transfer_id!r} cancelled by the receiver"))

    # -- for links and backends ---------------------------------------------------------

    def check_token(self, token: bytes) -> str | None:
        """Why a sender presenting `token` may not open this transfer, or None. The
        comparison takes the same time wherever the tokens differ (hmac.compare_digest),
        so timing tells a guesser nothing about how close it came."""
        if not token:
            return "no token presented (a transfer is accepted only with the one-time token its receiver issued)"
        if self._token is None:
            return "its one-time token was already used"
        if not hmac.compare_digest(self._token, token):
            return "wrong token"
        return None

    def use_token(self) -> None:
        """The token opened the transfer: forget it (a replay is refused)."""
        self._token = None

    def bind(self, link: RecvLink, backend: str) -> None:
        self._link = link
        self.backend = backend
        self._state = "open"
        self._t_open = time.perf_counter()

    def shrink(self, num_blocks: int) -> None:
        """At open, before any frame: the transfer covers only its first `num_blocks`
        positions (allowed with `allow_fewer`); blocks past them are never written."""
        assert self._state == "expected" and 1 <= num_blocks <= self.num_blocks
        self.block_ids = self.block_ids[:num_blocks]
        self.num_blocks = num_blocks
        self._claimed = np.ascontiguousarray(self._claimed[:, :num_blocks])
        self._verified = np.ascontiguousarray(self._verified[:, :num_blocks])

    def hold(self, obj: object, one_sided_writes: bool = False) -> None:
        """Keep `obj` alive as long as the transfer; `one_sided_writes`: the sender writes
        the pool itself (cuda_ipc), so a failure waits for it to stop."""
        self._held.append(obj)
        self._one_sided = self._one_sided or one_sided_writes

    def claim(self, first_layer: int, num_layers: int, dest_index: int, count: int) -> str | None:
        """Reserve (layers, positions) for one frame; a reason if the frame is invalid."""
        layers, n = self._claimed.shape
        if count < 1 or dest_index < 0 or dest_index + count > n:
            return f"positions [{dest_index}, {dest_index + count}) outside [0, {n})"
        if first_layer < 0 or first_layer + num_layers > layers:
            return f"layers [{first_layer}, {first_layer + num_layers}) outside [0, {layers})"
        area = self._claimed[first_layer : first_layer + num_layers, dest_index : dest_index + count]
        if area.any():
            return f"duplicate frame: positions [{dest_index}, {dest_index + count}) of layer {first_layer} sent twice"
        area[...] = True
        return None

    def mark_verified(
        self, first_layer: int, num_layers: int, dest_index: int, count: int, nbytes: int
    ) -> None:
        self._verified[first_layer : first_layer + num_layers, dest_index : dest_index + count] = True
        self._nbytes += nbytes
        if self._state == "open" and self._verified.all():
            self._state = "done"
            self._lease.cancel()
            self._stats = TransferStats(
                self.backend, self.num_blocks, self._nbytes, time.perf_counter() - self._t_open
            )
            self._held.clear()
            self._receiver.forget(self, None)
            self._future.set_result(self._stats)

    def begin_write(self) -> bool:
        """Before a worker thread writes the pool: False if the transfer has failed."""
        if not self.active:
            return False
        self._inflight += 1
        return True

    def end_write(self) -> None:
        self._inflight -= 1
        self._settle()

    def reading(self, read: asyncio.Future[Any] | None) -> None:
        """A socket read straight into the pool is in progress (cancelled on failure)."""
        self._reading = read

    def quiesced(self) -> None:
        """The sender will not write any more (it confirmed, or its connection is gone)."""
        self._quiesced = True
        if self._quiesce_timer is not None:
            self._quiesce_timer.cancel()
        self._settle()

    def fail(self, exc: TransferError, notify: bool = True, seq: int = -1) -> None:
        """Fail the transfer (no-op once done or failed); `notify`: tell the sender."""
        if not self.active:
            return
        self._state = "failed"
        self._exc = exc
        self._lease.cancel()
        if self._reading is not None:
            self._reading.cancel()  # synchronously drops the pending read: no byte lands after this
        self._receiver.forget(self, exc)
        link = self._link
        if link is not None:
            if notify:
                link.push(Error(self.transfer_id, exc.code, str(exc), seq))
            if self._one_sided and not link.closed:
                self._quiesced = False
                loop = asyncio.get_running_loop()
                self._quiesce_timer = loop.call_later(QUIESCE_TIMEOUT_S, self._quiesce_timeout)
        self._settle()

    @property
    def failure(self) -> TransferError | None:
        return self._exc

    @property
    def stats(self) -> TransferStats | None:
        return self._stats

    # -- internals -----------------------------------------------------------------------

    def _settle(self) -> None:
        if self._state == "failed" and self._inflight == 0 and self._quiesced and not self._future.done():
            self._held.clear()
            assert self._exc is not None
            self._future.set_exception(self._exc)

    def _lease_expired(self) -> None:
        self.fail(
            TransferTimeout(
                f"transfer {self.transfer_id!r} not complete within its {self.lease_s:g} s lease "
                f"({self.blocks_received} of {self.num_blocks} blocks received)"
            )
        )

    def _quiesce_timeout(self) -> None:
        log.warning(
            "transfer %s: sender did not confirm it stopped writing; giving the blocks back", self.transfer_id
        )
        self.quiesced()
