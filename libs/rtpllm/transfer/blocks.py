"""Moving payloads between a KV pool and host buffers.

A payload is one layer of `count` blocks laid out as [2 (K, V), count, block_size,
kv_heads, row] in the layer's stored format: `kv[layer].index_select(1, ids)`. Its size
is `payload_bytes(count, layer)`: the same for every layer of a uniform pool, the
layer's own for a mixed per-layer plan (`KVLayout.layer_bytes`).

CPU pools need no copy at all on the tcp path: `views()` describes a payload as byte
ranges of the pool itself (one per run of consecutive blocks, K runs then V runs), which
the socket reads and writes with scatter/gather system calls. Other paths copy through a
host buffer: gathered with `index_select`, scattered with a numpy fancy assignment over a
byte view (twice as fast as `index_copy_` on CPU, and it releases the GIL). CUDA pools
gather/scatter on a side stream, through pinned host buffers, so transfers overlap the
engine's own work.

`KVBlocks` is what the backends see. `PoolBlocks` is one pool tensor in this process (a
uniform pool); `LayerPoolBlocks` is a pool held as one page tensor per layer (a mixed
per-layer KV plan, `KVPool.layer_pages()`), with the same payloads layer by layer and
the same paths. A tensor-parallel engine's pool is spread over its ranks' processes
(`rtpllm.engine.sharded_blocks.ShardedPoolBlocks`): the same payloads, every KV head of
the model, gathered from and scattered to the ranks.

The KV tiers move whole blocks, every layer at once (`read_blocks`, `write_blocks`):
block-major host buffers, one block's bytes after another, each block its layers in
order, each layer [2, block_size, kv_heads, row] (`KVLayout.layer_offsets`), which is
the block codec's payload (kvstore/block_codec.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rtpllm.transfer.layout import KVLayout

if TYPE_CHECKING:
    from rtpllm.kvcache.kv_pool import KVPool


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

    `num_blocks` counts every block id a transfer may name; `payload_bytes(count, layer)`
    is the size of a payload of `count` blocks of `layer` (`layout.layer_bytes(layer)`
    each: the same for every layer of a uniform pool, per layer for a mixed one).
    `direct` is True when the whole pool of `layout` is in this process's memory:
    `pages` (one tensor [2, num_blocks, ...] per layer) and `stream` exist, so cuda_ipc
    may share the pool (`ipc_tensor`) and write it in place; a pool spread over
    processes is not direct and has neither."""

    layout: KVLayout
    device: torch.device
    is_cuda: bool
    num_blocks: int
    direct: bool = True

    def payload_bytes(self, count: int, layer: int) -> int:
        return count * self.layout.layer_bytes(layer)

    @property
    def max_layer_bytes(self) -> int:
        """One block of the largest layer: the least a frame must hold."""
        return self.layout.max_layer_bytes

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
        return self.layout.block_bytes

    @abstractmethod
    def read_blocks(self, ids: np.ndarray, out: torch.Tensor) -> None:
        """Copy whole blocks `ids` (every layer) into host buffer `out` (uint8), block-major:
        block `ids[i]` is `out[i * block_bytes:(i + 1) * block_bytes]`, its layers in
        order (`layout.layer_offsets`), each [2, block_size, kv_heads, row]. Returns once
        the bytes are there. Orders after nothing by itself: call `follow_engine()` first
        where the engine's writes of the blocks may still be queued (CUDA)."""

    @abstractmethod
    def write_blocks(self, ids: np.ndarray, src: torch.Tensor, after: torch.cuda.Event | None) -> None:
        """Write whole blocks from host buffer `src` (uint8, block-major as `read_blocks`
        gives them) into blocks `ids`; returns once they are in the pool (CUDA: complete
        on the device). `after`: a CUDA event the writes must follow."""

    def _block_major(self, buf: torch.Tensor, count: int) -> torch.Tensor:
        """Host buffer `buf` (uint8) as [count, layers, 2, block_size, kv_heads, head_dim]
        (a uniform layout)."""
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


class _LocalBlocks(KVBlocks):
    """What the pools of this process share: block ids on the pool's device, pinned
    staging for CUDA, a side stream ordered after the engine's, and one layer's payload
    moved between `pages[layer]` and a host buffer (`_payload` says how the buffer is
    typed and shaped)."""

    stream: torch.cuda.Stream | None
    pages: list[torch.Tensor]  # per layer [2, num_blocks, ...]
    _bytes: Any  # CPU pools: indexed by layer, [K/V, block, page bytes] (numpy)
    _memory: list[memoryview]  # CPU pools: per layer, its pages' bytes

    def ids_tensor(self, ids: np.ndarray) -> torch.Tensor:
        """Block ids as an index tensor on the pool's device (uploaded on the side stream,
        so it never waits for the engine's work)."""
        host = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        if not self.is_cuda:
            return host
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            return host.to(self.device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A staging buffer (uint8), pinned when the pool is on CUDA."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.is_cuda)

    def follow_engine(self) -> None:
        # The side stream, after the engine's writes.
        if self.is_cuda:
            assert self.stream is not None
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def engine_event(self) -> torch.cuda.Event | None:
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    @contextmanager
    def _side_stream(self, after: torch.cuda.Event | None = None) -> Iterator[None]:
        """CUDA: what the body enqueues runs on the side stream (after `after`, if given);
        the block returns once that work is done on the device."""
        assert self.stream is not None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            yield
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()

    def views(self, layer: int, ids: np.ndarray, max_runs: int | None = None) -> list[memoryview] | None:
        """CPU pool: the payload as byte ranges of the layer's pages themselves (K runs,
        then V runs); None for a CUDA pool or more than `max_runs` runs."""
        if self.is_cuda:
            return None
        starts, lengths = block_runs(ids)
        if max_runs is not None and len(starts) > max_runs:
            return None
        half = self.layout.layer_bytes(layer) // 2
        memory = self._memory[layer]
        out = []
        for kv_half in (0, 1):
            base = kv_half * self.num_blocks
            for start, n in zip(((base + starts) * half).tolist(), (lengths * half).tolist(), strict=True):
                out.append(memory[start : start + n])
        return out

    @abstractmethod
    def _payload(self, buf: torch.Tensor, layer: int, count: int) -> torch.Tensor:
        """Host buffer `buf` (uint8) as a payload of `count` blocks of `layer`, shaped and
        typed like `pages[layer][:, :count]`."""

    def gather(self, layer: int, ids: np.ndarray, out: torch.Tensor) -> None:
        dst = self._payload(out, layer, len(ids))
        page = self.pages[layer]
        if not self.is_cuda:
            torch.index_select(page, 1, self.ids_tensor(ids), out=dst)
            return
        with self._side_stream():
            dst.copy_(page.index_select(1, self.ids_tensor(ids)), non_blocking=True)

    def scatter(self, layer: int, ids: np.ndarray, src: torch.Tensor, after: torch.cuda.Event | None) -> None:
        if not self.is_cuda:
            payload = src[: self.payload_bytes(len(ids), layer)].numpy().reshape(2, len(ids), -1)
            self._bytes[layer][:, ids] = payload
            return
        data = self._payload(src, layer, len(ids))
        with self._side_stream(after):
            self.pages[layer].index_copy_(1, self.ids_tensor(ids), data.to(self.device, non_blocking=True))

    @abstractmethod
    def ipc_tensor(self) -> tuple[torch.Tensor, list[int]]:
        """What cuda_ipc shares: the one tensor the pages live in, and where each layer's
        page starts in it (bytes; empty where the tensor is [layers, ...] itself)."""


class PoolBlocks(_LocalBlocks):
    """One pool tensor in this process, seen as payloads (see the module docstring)."""

    def __init__(self, kv: torch.Tensor, layout: KVLayout) -> None:
        layout.check_pool(kv)
        self.kv = kv
        self.layout = layout
        self.device = kv.device
        self.is_cuda = kv.is_cuda
        self.num_blocks = kv.shape[2]
        self._unit = layout.block_layer_bytes  # K + V of one block in one layer
        self.pages = [kv[layer] for layer in range(kv.shape[0])]
        self.stream = torch.cuda.Stream(kv.device) if self.is_cuda else None
        if not self.is_cuda:
            # [layer, K/V, block, bytes of one block's K (or V)]
            self._bytes = kv.view(-1).view(torch.uint8).numpy().reshape(kv.shape[0], 2, self.num_blocks, -1)
            self._memory = [memoryview(layer.reshape(-1)) for layer in self._bytes]

    def ipc_tensor(self) -> tuple[torch.Tensor, list[int]]:
        return self.kv, []

    def _payload(self, buf: torch.Tensor, layer: int, count: int) -> torch.Tensor:
        return buf[: count * self._unit].view(self.kv.dtype).view(2, count, *self.kv.shape[3:])

    def read_blocks(self, ids: np.ndarray, out: torch.Tensor) -> None:
        # One gather over a block-major view of the pool, all layers at once.
        dst = self._block_major(out, len(ids))
        by_block = self.kv.permute(2, 0, 1, 3, 4, 5)
        if not self.is_cuda:
            torch.index_select(by_block, 0, self.ids_tensor(ids), out=dst)
            return
        with self._side_stream():
            dst.copy_(by_block.index_select(0, self.ids_tensor(ids)), non_blocking=True)

    def write_blocks(self, ids: np.ndarray, src: torch.Tensor, after: torch.cuda.Event | None) -> None:
        count = len(ids)
        if not self.is_cuda:
            # [count, layer, K/V, bytes] -> the pool's [layer, K/V, block, bytes]
            rows = src[: count * self.block_bytes].numpy().reshape(count, self.kv.shape[0], 2, -1)
            self._bytes[:, :, ids] = rows.transpose(1, 2, 0, 3)
            return
        data = self._block_major(src, count)
        with self._side_stream(after):
            by_block = self.kv.permute(2, 0, 1, 3, 4, 5)
            by_block.index_copy_(0, self.ids_tensor(ids), data.to(self.device, non_blocking=True))


# Layer regions of a mixed pool's buffer start at this alignment (rtpllm.kvcache.kv_pool).
REGION_ALIGN = 256


def _word_dtype(page_bytes: Sequence[int]) -> torch.dtype:
    """The widest integer word every layer's page is made of: torch copies move words,
    not bytes, and both ends of cuda_ipc checksum the same words."""
    for dtype, size in ((torch.int32, 4), (torch.int16, 2)):
        if all(p % size == 0 for p in page_bytes):
            return dtype
    return torch.uint8


class LayerPoolBlocks(_LocalBlocks):
    """A pool held as one page tensor per layer, in this process: a mixed per-layer KV
    plan, each layer in its own format (`KVPool.layer_pages()`). The payloads are those
    of `PoolBlocks`, layer by layer, each of its layer's size (`layout.layer_bytes`);
    whole blocks are every layer's pages one after the other (`layout.layer_offsets`).

    `pages[i]`: layer i [2, num_blocks, block_size, kv_heads, row] of any dtype,
    contiguous; moved as opaque words. `buffer`: the one allocation every page lives in
    (a mixed `KVPool`'s byte buffer), which cuda_ipc shares with per-layer offsets;
    None where there is none (then cuda_ipc is unavailable for this pool)."""

    def __init__(self, pages: Sequence[torch.Tensor], layout: KVLayout, buffer: torch.Tensor | None = None) -> None:
        if not layout.mixed:
            raise ValueError("LayerPoolBlocks is for a mixed per-layer layout; use PoolBlocks for one pool tensor")
        if len(pages) != layout.num_layers:
            raise ValueError(f"{len(pages)} layer pages for a layout of {layout.num_layers} layers")
        self.layout = layout
        self.device = pages[0].device
        self.is_cuda = self.device.type == "cuda"
        self.num_blocks = pages[0].shape[1]
        half = [layout.layer_bytes(i) // 2 for i in range(layout.num_layers)]
        byte_pages = []
        for i, page in enumerate(pages):
            if page.device != self.device or not page.is_contiguous() or page.shape[:2] != (2, self.num_blocks):
                raise ValueError(
                    f"layer {i}'s pages must be contiguous [2, {self.num_blocks}, ...] on {self.device}; "
                    f"got {tuple(page.shape)} on {page.device}"
                )
            as_bytes = page.view(torch.uint8).reshape(2, self.num_blocks, -1)
            if as_bytes.shape[2] != half[i]:
                raise ValueError(
                    f"layer {i}'s page is {as_bytes.shape[2]} bytes; a {layout.layer_formats[i]} page of "
                    f"this layout is {half[i]}"
                )
            byte_pages.append(as_bytes)
        self._word = _word_dtype(half)
        self.pages = [p.view(self._word) for p in byte_pages]  # [2, num_blocks, page words]
        self._buffer = buffer
        self._offsets = layout.layer_offsets
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        if not self.is_cuda:
            self._bytes = [p.numpy() for p in byte_pages]  # [K/V, block, page bytes] per layer
            self._memory = [memoryview(b.reshape(-1)) for b in self._bytes]

    @classmethod
    def allocate(cls, layout: KVLayout, num_blocks: int, device: str | torch.device = "cpu") -> LayerPoolBlocks:
        """A zeroed pool of `num_blocks` blocks of `layout` in one buffer (a kvstore's
        staging pool; calloc-backed on CPU: pages become resident only once used)."""
        sizes = [num_blocks * layout.layer_bytes(i) for i in range(layout.num_layers)]
        starts, total = [], 0
        for size in sizes:
            starts.append(total)
            total += -(-size // REGION_ALIGN) * REGION_ALIGN
        buffer = torch.zeros(total, dtype=torch.uint8, device=device)
        pages = [buffer[s : s + n].view(2, num_blocks, -1) for s, n in zip(starts, sizes, strict=True)]
        return cls(pages, layout, buffer)

    def ipc_tensor(self) -> tuple[torch.Tensor, list[int]]:
        if self._buffer is None:
            raise RuntimeError("this pool's layer pages are not in one buffer: it cannot be shared over CUDA IPC")
        base = self._buffer.data_ptr()
        offsets = [p.data_ptr() - base for p in self.pages]
        size = self._buffer.numel() * self._buffer.element_size()
        for off, page in zip(offsets, self.pages, strict=True):
            if off < 0 or off + page.numel() * page.element_size() > size:
                raise RuntimeError("a layer page lies outside the pool's buffer")
        return self._buffer, offsets

    def _payload(self, buf: torch.Tensor, layer: int, count: int) -> torch.Tensor:
        """Host buffer `buf` (uint8) as a payload [2, count, page words] of `layer`."""
        return buf[: self.payload_bytes(count, layer)].view(self._word).view(2, count, -1)

    def _layer_columns(self, rows: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer `layer` of block-major rows [count, block words] as [2, count, page words]
        (a strided view: each block's layer pages, K then V)."""
        word = rows.element_size()
        start, size = self._offsets[layer] // word, self.layout.layer_bytes(layer) // word
        return rows[:, start : start + size].view(rows.shape[0], 2, -1).transpose(0, 1)

    def read_blocks(self, ids: np.ndarray, out: torch.Tensor) -> None:
        count = len(ids)
        rows = out[: count * self.block_bytes].view(self._word).view(count, -1)
        index = self.ids_tensor(ids)
        if not self.is_cuda:
            # Straight into each block's layer columns, one gather per layer.
            for layer, page in enumerate(self.pages):
                torch.index_select(page, 1, index, out=self._layer_columns(rows, layer))
            return
        with self._side_stream():
            # Joined block-major on the device, then one contiguous copy to the host.
            joined = torch.empty(rows.shape, dtype=self._word, device=self.device)
            for layer, page in enumerate(self.pages):
                self._layer_columns(joined, layer).copy_(page.index_select(1, index))
            rows.copy_(joined, non_blocking=True)

    def write_blocks(self, ids: np.ndarray, src: torch.Tensor, after: torch.cuda.Event | None) -> None:
        count = len(ids)
        if not self.is_cuda:
            rows = src[: count * self.block_bytes].numpy().reshape(count, -1)
            for layer, dst in enumerate(self._bytes):
                start, size = self._offsets[layer], self.layout.layer_bytes(layer)
                # [count, K/V, page bytes] -> the layer's [K/V, block, page bytes]
                dst[:, ids] = rows[:, start : start + size].reshape(count, 2, -1).transpose(1, 0, 2)
            return
        rows = src[: count * self.block_bytes].view(self._word).view(count, -1)
        with self._side_stream(after):
            joined = rows.to(self.device, non_blocking=True)
            index = self.ids_tensor(ids)
            for layer, page in enumerate(self.pages):
                page.index_copy_(1, index, self._layer_columns(joined, layer))


def pool_blocks(pool: KVPool, namespace: bytes) -> KVBlocks:
    """The block movers' view of an engine's KV pool (one rank's, without tensor
    parallelism): `PoolBlocks` over its tensor when every layer has one format,
    `LayerPoolBlocks` over its layer pages for a mixed per-layer plan."""
    if pool.kv is not None:
        return PoolBlocks(pool.kv, KVLayout.of(pool.kv, namespace))
    layout = KVLayout.of_layers(namespace, pool.spec.formats, pool.block_size, pool.num_kv_heads, pool.head_dim)
    return LayerPoolBlocks(pool.layer_pages(), layout, pool.buffer)
