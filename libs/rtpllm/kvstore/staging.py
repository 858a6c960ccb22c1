"""The kvstore's staging pools: where blocks wait between the data plane and the codec.

One per KV layout the kvstore serves: a CPU tensor shaped like an engine's pool
(`[layers, 2, num_blocks, block_size, kv_heads, head_dim]`; for a mixed per-layer
layout one page tensor per layer, `LayerPoolBlocks`), a free list of its blocks,
and the data-plane ends on it: a KVReceiver (engines put blocks into it) and a KVSender
(the kvstore gets blocks out of it to an engine). Blocks are taken for one transfer and
given back when nothing reads or writes them any more (the transfer ended, or failed
and its lease ran out).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import torch

from rtpllm.transfer import KVLayout, KVReceiver, KVSender
from rtpllm.transfer.blocks import KVBlocks, LayerPoolBlocks


class StagingPool:
    """`num_blocks` CPU blocks of one layout, reused across transfers."""

    def __init__(self, layout: KVLayout, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("a staging pool needs at least one block")
        self.layout = layout
        self.num_blocks = num_blocks
        # torch.zeros is calloc-backed: pages become resident only once a transfer uses them.
        # What the data plane and the block codec move: the pool tensor, or a mixed
        # layout's layer pages.
        self.kv: torch.Tensor | KVBlocks
        if layout.mixed:
            self.kv = LayerPoolBlocks.allocate(layout, num_blocks)
        else:
            self.kv = torch.zeros(
                layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim,
                dtype=layout.torch_dtype,
            )  # fmt: skip
        self._free: deque[int] = deque(range(num_blocks))
        self._released = asyncio.Event()
        self.receiver: KVReceiver | None = None
        self.sender: KVSender | None = None

    @staticmethod
    def blocks_for(layout: KVLayout, budget_bytes: int) -> int:
        """Blocks of `layout` in `budget_bytes` (at least one)."""
        return max(1, budget_bytes // layout.block_bytes)

    async def start(self, host: str, port: int) -> None:
        """Open the data-plane ends (on the running event loop)."""
        self.receiver = KVReceiver(self.kv, self.layout, host=host, port=port)
        await self.receiver.start()
        self.sender = KVSender(self.kv, self.layout, prefer=("shm", "tcp"))

    async def close(self) -> None:
        if self.sender is not None:
            await self.sender.close()
        if self.receiver is not None:
            await self.receiver.close()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        """Up to `n` free blocks (fewer, or none, when the pool runs short)."""
        return [self._free.popleft() for _ in range(min(n, len(self._free)))]

    async def take_waiting(self, n: int, timeout_s: float) -> list[int]:
        """`take(n)`, waiting up to `timeout_s` for blocks if none is free."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while n > 0 and not self._free and (remaining := deadline - loop.time()) > 0:
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), remaining)
        return self.take(n)

    def give_back(self, block_ids: list[int]) -> None:
        if block_ids:
            self._free.extend(block_ids)
            self._released.set()
