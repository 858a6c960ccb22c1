"""The receiving end of the data plane: one KVReceiver per decode instance.

The decode side allocates blocks for a request, calls `expect(transfer_id, block_ids,
lease_s)`, announces `endpoint`, the transfer id and the transfer's one-time `token` to
the prefill side (over NATS, the authenticated control plane), and awaits
`IncomingTransfer.wait()`. Senders connect to the receiver's TCP listener; each
connection (a RecvLink) carries one transfer at a time, over the backend it chose at its
handshake. A connection that cannot show the token of a transfer this receiver expects
is refused at its handshake, and a token opens its transfer once.

The decode side may reuse the blocks as soon as `wait()` has returned or raised: only
the transfer's blocks are ever written (recv_link.py checks every frame first), and no
write is in flight any more when `wait()` ends (incoming.py).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from rtpllm.transfer.blocks import KVBlocks, as_blocks
from rtpllm.transfer.endpoint import BACKENDS, KVEndpoint, advertised_address, local_host_id, shm_available
from rtpllm.transfer.errors import TransferAborted, TransferError, TransferRefused
from rtpllm.transfer.framing import Error, FrameConn
from rtpllm.transfer.incoming import IncomingTransfer
from rtpllm.transfer.layout import KVLayout
from rtpllm.transfer.recv_link import RecvLink
from rtpllm.transfer.shm import sweep_stale_rings

# Finished and failed transfer ids remembered, so late frames get a precise refusal.
REMEMBERED = 4096
# One-time transfer tokens: 128 random bits, beyond guessing within any lease.
TOKEN_BYTES = 16


class KVReceiver:
    """The receiving end of the data plane for one KV pool (one per decode instance).

    `kv`: the pool tensor with its `layout`, or a ready KVBlocks (a tensor-parallel
    engine's pool, spread over its ranks). `backends`: what to accept (default: every
    one that applies: "tcp" always, "shm" where /dev/shm exists, "cuda_ipc" for a CUDA
    pool in this process). `advertise_host`: the address put
    in `endpoint` when listening on a wildcard address. `shm_slots` x `shm_slot_bytes`:
    the shared-memory ring of each shm connection. `max_pending_frames`: frames per
    connection being verified/copied at once (bounds staging memory). `threads`: worker
    threads for checksums and copies.
    """

    def __init__(
        self,
        kv: torch.Tensor | KVBlocks,
        layout: KVLayout | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        backends: Sequence[str] | None = None,
        *,
        advertise_host: str | None = None,
        shm_slots: int = 4,
        shm_slot_bytes: int = 16 << 20,
        max_pending_frames: int = 4,
        threads: int = 2,
    ) -> None:
        self.pool = as_blocks(kv, layout)
        self.layout = self.pool.layout
        usable = ["tcp"]
        if shm_available():
            usable.append("shm")
        if self.pool.is_cuda and self.pool.direct:  # cuda_ipc shares and writes the pool tensor itself
            usable.append("cuda_ipc")
        if backends is None:
            backends = usable
        for b in backends:
            if b not in BACKENDS:
                raise ValueError(f"unknown backend {b!r}; known: {BACKENDS}")
            if b not in usable:
                raise ValueError(f"backend {b!r} does not apply to this receiver (usable: {usable})")
        self.backends = list(backends)
        self.host, self.port = host, port
        self.advertise_host = advertise_host
        self.shm_slots, self.shm_slot_bytes = shm_slots, shm_slot_bytes
        self.max_pending_frames = max_pending_frames
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="kv-recv")
        self._expected: dict[str, IncomingTransfer] = {}
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._links: dict[RecvLink, asyncio.Task[None]] = {}

    async def start(self) -> None:
        """Listen (call from the event loop that will run the transfers)."""
        if "shm" in self.backends:
            sweep_stale_rings()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.create_server((self.host, self.port), family=family, backlog=128)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def close(self) -> None:
        """Stop listening, drop every connection, fail every transfer not done."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for link in list(self._links):
            link.conn.close()
        if self._links:
            await asyncio.wait(list(self._links.values()))
        for transfer in list(self._expected.values()):
            transfer.fail(
                TransferAborted(f"receiver closed before transfer {transfer.transfer_id!r} was done")
            )
        self.executor.shutdown(wait=False)

    @property
    def endpoint(self) -> KVEndpoint:
        """What senders need to reach this receiver (after start())."""
        if self._listener is None:
            raise RuntimeError("KVReceiver.start() first")
        host = self.advertise_host or advertised_address(self.host)
        return KVEndpoint(host, self.port, local_host_id(), str(self.pool.device), list(self.backends))

    def expect(
        self, transfer_id: str, block_ids: Sequence[int], lease_s: float, *, allow_fewer: bool = False
    ) -> IncomingTransfer:
        """Register that transfer `transfer_id` fills pool blocks `block_ids` (position i
        of the transfer -> block block_ids[i]); it must complete within `lease_s` seconds.
        `allow_fewer`: the sender may open it with fewer blocks, which then fill the
        leading positions only (the kvstore sends what it has of a prefix); the transfer
        is complete when those have landed, `num_blocks` tells how many.
        The returned transfer's `token` (random, 128 bits) must reach the sender over the
        control plane with the endpoint and the id: without it the transfer cannot be
        opened, and it opens the transfer once.
        Call from the receiver's event loop. CUDA: writes into the blocks wait for the
        work enqueued so far on the calling thread's current stream (the blocks' previous
        users: call it where the engine's stream is current, the default stream unless
        the engine sets another)."""
        if not transfer_id:
            raise ValueError("empty transfer id")
        if transfer_id in self._expected:
            raise ValueError(f"transfer {transfer_id!r} is already expected")
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        ids = np.ascontiguousarray(np.asarray(block_ids, dtype=np.int64).reshape(-1))
        if len(ids) == 0:
            raise ValueError("a transfer needs at least one block")
        self.pool.check_ids(ids, "block ids")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("block ids of one transfer must be distinct")
        self._gone.pop(transfer_id, None)
        token = secrets.token_bytes(TOKEN_BYTES)
        transfer = IncomingTransfer(self, transfer_id, ids, lease_s, self.pool.engine_event(), token, allow_fewer)
        self._expected[transfer_id] = transfer
        return transfer

    # -- for links and transfers ---------------------------------------------------------

    def expected(self, transfer_id: str) -> IncomingTransfer | None:
        """The expected transfer of that id (not yet done or failed), if any."""
        return self._expected.get(transfer_id)

    def admit(self, transfer_id: str, token: bytes) -> Error | None:
        """The refusal of a connection whose Hello names `transfer_id` with `token`, or
        None if that is an expected transfer and its unused token (checked, not used
        up: the Open that follows uses it)."""
        transfer = self._expected.get(transfer_id)
        if transfer is None:
            return self.refusal(transfer_id)
        problem = transfer.check_token(token)
        if problem is not None:
            return Error(transfer_id, TransferRefused.code, f"transfer {transfer_id!r}: {problem}")
        return None

    def forget(self, transfer: IncomingTransfer, exc: TransferError | None) -> None:
        """A transfer is over: remember how, for frames that still come for it."""
        if self._expected.get(transfer.transfer_id) is transfer:
            del self._expected[transfer.transfer_id]
        if exc is None:
            entry = (TransferRefused.code, f"transfer {transfer.transfer_id!r} is already complete")
        else:
            entry = (exc.code, f"transfer {transfer.transfer_id!r} is over: {exc}")
        self._gone[transfer.transfer_id] = entry
        while len(self._gone) > REMEMBERED:
            self._gone.popitem(last=False)

    def refusal(self, transfer_id: str) -> Error:
        """The Error frame for a transfer id this receiver does not (or no longer) expect."""
        code, message = self._gone.get(
            transfer_id,
            (TransferRefused.code, f"unknown transfer {transfer_id!r}: not expected by this receiver"),
        )
        return Error(transfer_id, code, message)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            link = RecvLink(self, FrameConn(sock))
            task = loop.create_task(link.serve())
            self._links[link] = task
            task.add_done_callback(lambda _, link=link: self._links.pop(link, None))
