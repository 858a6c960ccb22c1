"""Moving payloads between a KV pool and host buffers.

A payload is one layer of `count` blocks laid out as [2 (K, V), count, block_size,
kv_heads, head_dim] in the pool's dtype: `kv[layer].index_select(1, ids)`.

CPU pools need no copy at all on the tcp path: `views()` describes a payload as byte
ranges of the pool itself (one per run of consecutive blocks, K runs then V runs), which
the socket reads and writes with scatter/gather system calls. Other paths copy through a
host buffer: gathered with `index_select`, scattered with a numpy fancy assignment over a
byte view (twice as fast as `index_copy_` on CPU, and it releases the GIL). CUDA pools
gather/scatter on a side stream, through pinned host buffers, so transfers overlap the
engine's own work.

`KVBlocks` is what the backends see; `PoolBlocks` is one pool tensor in this process. A
tensor-parallel engine's pool is spread over its ranks' processes
(`rtpllm.engine.sharded_blocks.ShardedPoolBlocks`): the same payloads, every KV head of
the model, gathered from and scattered to the ranks.

The KV tiers move whole blocks, every layer at once (`read_blocks`, `write_blocks`):
block-major host buffers, one block's bytes `[layers, 2, block_size, kv_heads,
head_dim]` after another, which is the block codec's payload (kvstore/block_codec.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from rtpllm.transfer.layout import KVLayout


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable 1-D byte memoryview over a contiguous CPU tensor (any dtype)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def block_runs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first block, length) arrays of the runs of consecutive ascending ids."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(ids)]))
    return ids[starts], ends - starts


class KVBlocks(ABC):
    """A KV pool seen as payloads of its `layout`: the interface the backends use.

    `num_blocks` counts every block id a transfer may name; `unit` is the payload bytes
    of one block in one layer. `direct` is True when `kv` is the whole pool of `layout`
    in this process's memory, so cuda_ipc may share it and write it in place; a pool
    spread over processes is not (`kv` and `stream` exist only where `direct`)."""

    layout: KVLayout
    device: torch.device
    is_cuda: bool
    num_blocks: int
    unit: int
    direct: bool = True

    def payload_bytes(self, count: int) -> int:
        return count * self.unit

    def check_ids(self, ids: np.ndarray, what: str) -> None:
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_blocks):
            raise ValueError(f"{what} out of range [0, {self.num_blocks}): {ids.tolist()[:16]}")

    def views(self, layer: int, ids: np.ndarray, max_runs: int | None = None) -> list[memoryview] | None:
        """The payload as byte ranges of the pool itself, when it can be read and written
        in place (no copy); None otherwise."""
        return None

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A staging buffer (uint8) for `gather` and `scatter`."""
        return torch.empty(nbytes, dtype=torch.uint8)

    @abstractmethod
    def gather(self, layer: int, ids: np.ndarray, out: torch.Tensor) -> None:
        """Copy the payload of blocks `ids` into host buffer `out` (uint8); returns once
        the bytes are there. Run it off the event loop for large payloads."""

    @abstractmethod
    def scatter(self, layer: int, ids: np.ndarray, src: torch.Tensor, after: torch.cuda.Event | None) -> None:
        """Write the payload in host buffer `src` (uint8) to blocks `ids`; returns once it
        is in the pool (CUDA: complete on the device, so visible to any later work).
        `after`: a CUDA event the write must follow (the blocks' previous users)."""

    @property
    def block_bytes(self) -> int:
        """Bytes of one whole block: every layer, K and V."""
        return self.unit * self.layout.num_layers

    @abstractmethod
    def read_blocks(self, ids: np.ndarray, out: torch.Tensor) -> None:
        """Copy whole blocks `ids` (every layer) into host buffer `out` (uint8), block-major:
        block `ids[i]` is `out[i * block_bytes:(i + 1) * block_bytes]`, laid out [layers,
        2, block_size, kv_heads, head_dim]. Returns once the bytes are there. Orders after
        nothing by itself: call `follow_engine()` first where the engine's writes of the
        blocks may still be queued (CUDA)."""

    @abstractmethod
    def write_blocks(self, ids: np.ndarray, src: torch.Tensor, after: torch.cuda.Event | None) -> None:
        """Write whole blocks from host buffer `src` (uint8, block-major as `read_blocks`
        gives them) into blocks `ids`; returns once they are in the pool (CUDA: complete
        on the device). `after`: a CUDA event the writes must follow."""

    def _block_major(self, buf: torch.Tensor, count: int) -> torch.Tensor:
        """Host buffer `buf` (uint8) as [count, layers, 2, block_size, kv_heads, head_dim]."""
        lay = self.layout
        return (
            buf[: count * self.block_bytes]
            .view(lay.torch_dtype)
            .view(count, lay.num_layers, 2, lay.block_size, lay.num_kv_heads, lay.head_dim)
        )

    @abstractmethod
    def follow_engine(self) -> None:
        """Order later gathers after everything the caller's current stream has enqueued
        so far (the engine's writes of the blocks about to be sent)."""

    @abstractmethod
    def engine_event(self) -> torch.cuda.Event | None:
        """An event on the caller's current stream (None on CPU): writes into blocks
        allocated just now wait for it, i.e. for the blocks' previous readers."""


def as_blocks(kv: torch.Tensor | KVBlocks, layout: KVLayout | None) -> KVBlocks:
    """What KVSender and KVReceiver take: a pool tensor with its layout, or a ready
    KVBlocks (whose layout, if `layout` is given too, must be that one)."""
    if isinstance(kv, KVBlocks):
        if layout is not None and layout != kv.layout:
            raise ValueError(f"layout does not match the pool's: {layout.mismatch(kv.layout, 'given', 'pool')}")
        return kv
    if layout is None:
        raise ValueError("a KV pool tensor needs its KVLayout")
    return PoolBlocks(kv, layout)


class PoolBlocks(KVBlocks):
    """One pool tensor in this process, seen as payloads (see the module docstring)."""

    def __init__(self, kv: torch.Tensor, layout: KVLayout) -> None:
        layout.check_pool(kv)
        self.kv = kv
        self.layout = layout
        self.device = kv.device
        self.is_cuda = kv.is_cuda
        self.num_blocks = kv.shape[2]
        self.unit = layout.block_layer_bytes  # K + V of one block in one layer
        self.stream = torch.cuda.Stream(kv.device) if self.is_cuda else None
        if not self.is_cuda:
            # [layer, K/V, block, bytes of one block's K (or V)]
            self._bytes = kv.view(-1).view(torch.uint8).numpy().reshape(kv.shape[0], 2, self.num_blocks, -1)
            self._memory = memoryview(self._bytes.reshape(-1))

    def ids_tensor(self, ids: np.ndarray) -> torch.Tensor:
        """Block ids as an index tensor on the pool's device (uploaded on the side stream,
        so it never waits for the engine's work)."""
        host = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        if not self.is_cuda:
            return host
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            return host.to(self.device)

    def views(self, layer: int, ids: np.ndarray, max_runs: int | None = None) -> list[memoryview] | None:
        """CPU pool: the payload as byte ranges of the pool itself (K runs, then V
        runs); None for a CUDA pool or more than `max_runs` runs."""
        if self.is_cuda:
            return None
        starts, lengths = block_runs(ids)
        if max_runs is not None and len(starts) > max_runs:
            return None
        half = self.unit // 2
        out = []
        for kv_half in (0, 1):
            base = (layer * 2 + kv_half) * self.num_blocks
            for start, n in zip(((base + starts) * half).tolist(), (lengths * half).tolist(), strict=True):
                out.append(self._memory[start : start + n])
        return out

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A staging buffer (uint8), pinned when the pool is on CUDA."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.is_cuda)

    def _typed(self, buf: torch.Tensor, count: int) -> torch.Tensor:
        return buf[: self.payload_bytes(count)].view(self.kv.dtype).view(2, count, *self.kv.shape[3:])

    def gather(self, layer: int, ids: np.ndarray, out: torch.Tensor) -> None:
        dst = self._typed(out, len(ids))
        if not self.is_cuda:
            torch.index_select(self.kv[layer], 1, self.ids_tensor(ids), out=dst)
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            dst.copy_(self.kv[layer].index_select(1, self.ids_tensor(ids)), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()

    def scatter(self, layer: int, ids: np.ndarray, src: torch.Tensor, after: torch.cuda.Event | None) -> None:
        if not self.is_cuda:
            payload = src[: self.payload_bytes(len(ids))].numpy().reshape(2, len(ids), -1)
            self._bytes[layer][:, ids] = payload
            return
        data = self._typed(src, len(ids))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            self.kv[layer].index_copy_(1, self.ids_tensor(ids), data.to(self.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()

    def read_blocks(self, ids: np.ndarray, out: torch.Tensor) -> None:
        # One gather over a block-major view of the pool, all layers at once.
        dst = self._block_major(out, len(ids))
        by_block = self.kv.permute(2, 0, 1, 3, 4, 5)
        if not self.is_cuda:
            torch.index_select(by_block, 0, self.ids_tensor(ids), out=dst)
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            dst.copy_(by_block.index_select(0, self.ids_tensor(ids)), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()

    def write_blocks(self, ids: np.ndarray, src: torch.Tensor, after: torch.cuda.Event | None) -> None:
        count = len(ids)
        if not self.is_cuda:
            # [count, layer, K/V, bytes] -> the pool's [layer, K/V, block, bytes]
            rows = src[: count * self.block_bytes].numpy().reshape(count, self.kv.shape[0], 2, -1)
            self._bytes[:, :, ids] = rows.transpose(1, 2, 0, 3)
            return
        data = self._block_major(src, count)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            by_block = self.kv.permute(2, 0, 1, 3, 4, 5)
            by_block.index_copy_(0, self.ids_tensor(ids), data.to(self.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()

    def follow_engine(self) -> None:
        # The side stream, after the engine's writes.
        if self.is_cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def engine_event(self) -> torch.cuda.Event | None:
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event
