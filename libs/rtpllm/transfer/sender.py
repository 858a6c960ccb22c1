"""The sending end of the data plane: one KVSender per prefill instance.

`open()` picks a backend, takes an idle connection to the receiver (or connects and
does the handshake) and opens the transfer with the one-time token the receiver issued
for it (it came over NATS with the endpoint and the transfer id); `send()` ships blocks
as prefill produces them; `finish()` waits until the receiver has verified and landed
everything. A connection (SendLink) carries one transfer at a time and goes back to the
pool after a clean finish; any failure closes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from rtpllm.transfer.backend import BackendUnavailable
from rtpllm.transfer.blocks import KVBlocks, as_blocks
from rtpllm.transfer.endpoint import BACKENDS, KVEndpoint, local_host_id, shm_available
from rtpllm.transfer.errors import (
    UNAVAILABLE,
    TransferAborted,
    TransferRefused,
    TransferTimeout,
    error_from_code,
)
from rtpllm.transfer.framing import PROTOCOL_VERSION, Error, FrameConn, Hello, Open, Opened, Welcome
from rtpllm.transfer.layout import KVLayout
from rtpllm.transfer.outgoing import OutgoingTransfer
from rtpllm.transfer.send_link import LinkKey, SendLink

log = logging.getLogger(__name__)


class KVSender:
    """The sending end of the data plane for one KV pool (one per prefill instance).

    `kv`: the pool tensor with its `layout`, or a ready KVBlocks (a tensor-parallel
    engine's pool, spread over its ranks). `prefer`: backends in order of preference;
    `open()` takes the first one the endpoint accepts and that applies (cuda_ipc: same
    host and both pools on CUDA, this one in this process; shm: same host; tcp: always), falling back to the next if it cannot be set up. `max_frame_bytes`:
    payload bytes per frame (one layer of a group of blocks). `max_idle_links`: idle
    connections kept per receiver and backend. `threads`: worker threads for gathers and
    checksums.
    """

    def __init__(
        self,
        kv: torch.Tensor | KVBlocks,
        layout: KVLayout | None = None,
        prefer: Sequence[str] = ("cuda_ipc", "shm", "tcp"),
        *,
        max_frame_bytes: int = 16 << 20,
        max_idle_links: int = 4,
        threads: int = 2,
    ) -> None:
        for b in prefer:
            if b not in BACKENDS:
                raise ValueError(f"unknown backend {b!r}; known: {BACKENDS}")
        self.pool = as_blocks(kv, layout)
        self.layout = self.pool.layout
        self.prefer = list(prefer)
        self.max_frame_bytes = max(max_frame_bytes, self.pool.max_layer_bytes)
        self.max_idle_links = max_idle_links
        self.threads = threads
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="kv-send")
        self._idle: dict[LinkKey, list[SendLink]] = {}
        self._links: set[SendLink] = set()

    def backends_for(self, endpoint: KVEndpoint) -> list[str]:
        """The backends `open()` would try for `endpoint`, in order."""
        same_host = endpoint.host_id == local_host_id()
        out = []
        for b in self.prefer:
            if b not in endpoint.backends:
                continue
            if b == "cuda_ipc" and not (
                same_host and self.pool.is_cuda and self.pool.direct and endpoint.device.startswith("cuda")
            ):
                continue
            if b == "shm" and not (same_host and shm_available()):
                continue
            out.append(b)
        return out

    async def open(
        self, endpoint: KVEndpoint, transfer_id: str, num_blocks: int, timeout_s: float, *, token: bytes
    ) -> OutgoingTransfer:
        """Open transfer `transfer_id` (already expected by the receiver) of `num_blocks`
        blocks, with `token`, the one-time token the receiver's `expect()` issued for it.
        `timeout_s` bounds the handshake and, later, every wait for the receiver.
        Raises TransferRefused (missing, wrong or already used token, layout/namespace
        mismatch, unknown transfer, no common backend), TransferTimeout, TransferAborted
        (cannot connect / connection lost)."""
        if num_blocks < 1:
            raise ValueError("a transfer needs at least one block")
        candidates = self.backends_for(endpoint)
        if not candidates:
            raise TransferRefused(
                f"no backend in common: sender prefers {self.prefer}, receiver accepts {endpoint.backends} "
                f"(same host: {endpoint.host_id == local_host_id()}, receiver device {endpoint.device})"
            )
        problems = []
        for backend in candidates:
            try:
                return await self._open_on(backend, endpoint, transfer_id, num_blocks, timeout_s, token)
            except BackendUnavailable as exc:
                log.info("backend %s unavailable for %s:%d: %s", backend, endpoint.host, endpoint.port, exc)
                problems.append(f"{backend}: {exc}")
        raise TransferRefused("no usable backend: " + "; ".join(problems))

    async def close(self) -> None:
        """Close every connection (transfers still open fail on the receiver)."""
        links = list(self._links)
        for link in links:
            link.close()
        for link in links:
            await link.wait_closed()
        self._idle.clear()
        self.executor.shutdown(wait=False)

    # -- for transfers and links -----------------------------------------------------------

    def release(self, link: SendLink) -> None:
        """A transfer finished cleanly: keep its connection for the next one."""
        link.current = None
        idle = self._idle.setdefault(link.key, [])
        if link.closed or link.failure is not None or len(idle) >= self.max_idle_links:
            link.close()
        else:
            idle.append(link)

    def forget_link(self, link: SendLink) -> None:
        """A connection is gone."""
        self._links.discard(link)
        idle = self._idle.get(link.key)
        if idle and link in idle:
            idle.remove(link)

    # -- internals -----------------------------------------------------------------------

    async def _open_on(
        self, backend: str, endpoint: KVEndpoint, transfer_id: str, num_blocks: int, timeout_s: float, token: bytes
    ) -> OutgoingTransfer:
        key = (endpoint.host, endpoint.port, backend)
        for pooled in (True, False):
            link = self._take_idle(key) if pooled else None
            if pooled and link is None:
                continue
            if link is None:
                link = await self._connect(endpoint, backend, key, timeout_s, transfer_id, token)
            link.timeout_s = timeout_s
            transfer = OutgoingTransfer(self, link, transfer_id, num_blocks)
            link.current = transfer
            try:
                reply = await link.request(Open(transfer_id, num_blocks, token), timeout_s)
            except TransferAborted:
                link.close()
                if pooled:  # the idle connection had died: try a fresh one
                    continue
                raise
            if isinstance(reply, Error):
                link.close()
                raise error_from_code(reply.code, reply.message)
            if not isinstance(reply, Opened) or reply.transfer_id != transfer_id:
                link.close()
                raise TransferRefused(f"unexpected {type(reply).__name__} in answer to Open")
            try:
                link.path.on_opened(reply, transfer)
            except BackendUnavailable:
                link.close()
                raise
            return transfer
        raise AssertionError("unreachable")

    def _take_idle(self, key: LinkKey) -> SendLink | None:
        idle = self._idle.get(key, [])
        while idle:
            link = idle.pop()
            if not link.closed and link.failure is None:
                return link
        return None

    async def _connect(
        self, endpoint: KVEndpoint, backend: str, key: LinkKey, timeout_s: float, transfer_id: str, token: bytes
    ) -> SendLink:
        where = f"{endpoint.host}:{endpoint.port}"
        try:
            conn = await asyncio.wait_for(FrameConn.connect(endpoint.host, endpoint.port), timeout_s)
        except TimeoutError as exc:
            raise TransferTimeout(f"connecting to receiver {where} timed out after {timeout_s:g} s") from exc
        except OSError as exc:
            raise TransferAborted(f"cannot connect to receiver {where}: {exc}") from exc
        link = SendLink(self, conn, backend, key)
        self._links.add(link)
        layout = self.layout
        hello = Hello(
            PROTOCOL_VERSION, backend, local_host_id(), layout.namespace, layout.num_layers, layout.block_size,
            layout.num_kv_heads, layout.head_dim, layout.dtype, self.max_frame_bytes, transfer_id, token,
            list(layout.layer_formats),
        )  # fmt: skip
        try:
            reply = await link.request(hello, timeout_s)
        except BaseException:
            link.close()
            raise
        if isinstance(reply, Error):
            link.close()
            if reply.code == UNAVAILABLE:
                raise BackendUnavailable(reply.message)
            raise error_from_code(reply.code, f"receiver {where} refused the connection: {reply.message}")
        if not isinstance(reply, Welcome) or reply.backend != backend:
            link.close()
            raise TransferRefused(f"unexpected {type(reply).__name__} in answer to Hello from {where}")
        try:
            await link.path.setup(reply)
        except BaseException:
            link.close()
            raise
        return link
