"""One transfer being sent, as the sending side sees it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from rtpllm.transfer.errors import TransferAborted, TransferError, TransferRefused, error_from_code
from rtpllm.transfer.framing import Abort, Done, Error, Finish
from rtpllm.transfer.stats import TransferStats

if TYPE_CHECKING:
    from rtpllm.transfer.send_link import SendLink
    from rtpllm.transfer.sender import KVSender


class OutgoingTransfer:
    """One transfer being sent (see `KVSender.open`). `backend`: the backend in use."""

    def __init__(self, sender: KVSender, link: SendLink, transfer_id: str, num_blocks: int) -> None:
        self.backend = link.backend
        self.transfer_id = transfer_id
        self.num_blocks = num_blocks
        self._sender = sender
        self._link = link
        self.lock = asyncio.Lock()  # one send/finish/abort at a time
        self._sent = np.zeros(num_blocks, dtype=bool)
        self._nbytes = 0
        self._t0 = time.perf_counter()
        self._state = "open"  # -> "finished" | "aborted"

    @property
    def blocks_sent(self) -> int:
        return int(self._sent.sum())

    async def send(self, src_block_ids: Sequence[int] | np.ndarray | torch.Tensor, dest_index: int) -> None:
        """Ship blocks `src_block_ids` of the sender's pool to positions [dest_index,
        dest_index + len) of the transfer. Returns once the source blocks have been read
        (they may change afterwards); acks come later, `finish()` waits for them.
        Pipelined layer by layer. Raises the transfer's failure if it has failed.
        CUDA: the blocks are read after the work enqueued so far on the calling thread's
        current stream (the prefill that wrote them)."""
        if isinstance(src_block_ids, torch.Tensor):
            src_block_ids = src_block_ids.cpu().numpy()
        ids = np.ascontiguousarray(np.asarray(src_block_ids, dtype=np.int64).reshape(-1))
        async with self.lock:
            self._check()
            if len(ids) == 0:
                return
            self._sender.pool.check_ids(ids, "source block ids")
            if dest_index < 0 or dest_index + len(ids) > self.num_blocks:
                raise ValueError(
                    f"positions [{dest_index}, {dest_index + len(ids)}) outside [0, {self.num_blocks})"
                )
            self._nbytes += await self._link.path.send(self, ids, dest_index)
            self._sent[dest_index : dest_index + len(ids)] = True

    async def finish(self) -> TransferStats:
        """Wait until the receiver has verified and landed all `num_blocks` blocks."""
        async with self.lock:
            self._check()
            if not self._sent.all():
                raise TransferError(
                    f"finish() with {self.num_blocks - self.blocks_sent} of {self.num_blocks} blocks not sent"
                )
            link = self._link
            await link.wait_until(lambda: link.unacked == 0, "acknowledgement")
            reply = await link.request(Finish(self.transfer_id), link.timeout_s)
            if isinstance(reply, Error):
                raise error_from_code(reply.code, reply.message)
            if not isinstance(reply, Done):
                link.close()
                raise TransferRefused(f"unexpected {type(reply).__name__} in answer to Finish")
            self._state = "finished"
            self._sender.release(link)
            return TransferStats(self.backend, self.num_blocks, self._nbytes, time.perf_counter() - self._t0)

    async def abort(self, reason: str) -> None:
        """Give up: the receiver's `wait()` raises TransferAborted. Idempotent."""
        if self._state != "open":
            return
        link = self._link
        link.fail(TransferAborted(f"transfer {self.transfer_id!r} aborted by the sender: {reason}"))
        async with self.lock:
            if self._state != "open":
                return
            self._state = "aborted"
            await link.path.quiesce()
            if not link.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(link.conn.send(Abort(self.transfer_id, reason)), link.timeout_s)
            link.close()

    def _check(self) -> None:
        if self._state == "finished":
            raise TransferError(f"transfer {self.transfer_id!r} is already finished")
        if self._state == "aborted":
            raise TransferAborted(f"transfer {self.transfer_id!r} was aborted")
        self._link.check()
