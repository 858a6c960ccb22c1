"""A tensor-parallel engine's KV pool as the PD data plane and the KV tiers see it:
whole blocks.

Each rank's pool holds its own KV heads (engine/tensor_parallel.py). On the wire and in
the tiers a TP=N instance moves whole blocks, every KV head of the model
(`KVLayout.num_kv_heads` is the model's), so two instances exchange blocks whenever
their layouts and namespaces match, as unsharded ones do, and a tier holds the bytes a
TP=1 pool would. Rank 0 runs the data plane and the tiers: `gather` asks every rank for
its heads' slice of the blocks (engine/tp_kv.py, over the KV group) and interleaves them
with its own; `scatter` splits a payload by heads, every rank writes its slice, and it
returns once all have. `read_blocks` / `write_blocks` do the same for every layer of the
blocks in one operation of the KV group (the tiers' whole blocks, block-major). The
other ranks' bytes pass through rank 0's host memory (the KV group is gloo), not from
rank to rank; cuda_ipc, which writes one pool tensor in place, is not offered (`direct`
is False).

- Replicated KV heads (more ranks than KV heads): a head is read from the first rank
  that holds it and written to every rank that holds it.
- Quantized pools (fp8/int8) store a block's page of one layer's K (or V) as the values
  [block_size, heads, head_dim] followed by the scales [block_size, heads]
  (kvcache/kv_format.py), so a head's bytes are two runs of the page, not one slice of
  the `[..., heads, head_dim + 4]` tensor: values and scales are split and joined by
  heads separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from rtpllm.engine.tp_kv import ALL_LAYERS, KVChannel
from rtpllm.transfer.blocks import KVBlocks, PoolBlocks
from rtpllm.transfer.layout import KVLayout

T = TypeVar("T")
# Runs one operation of the KV channel (TensorParallel.guard: a broken group raises at
# once, an error of the group breaks it).
Guard = Callable[[Callable[[], T]], T]


class ShardedPoolBlocks(KVBlocks):
    """Rank 0's view of every rank's pool as one pool of whole blocks."""

    direct = False

    def __init__(
        self,
        kv: torch.Tensor,
        layout: KVLayout,
        heads: Sequence[tuple[int, int]],
        channel: KVChannel,
        guard: Guard,
        quantized_head_dim: int | None = None,
    ) -> None:
        """`kv`: rank 0's pool tensor; `layout`: the whole block's (every KV head);
        `heads[r]`: (first KV head, KV heads) of rank r's pool; `quantized_head_dim`: the
        head dim of an fp8/int8 pool (its rows are head_dim + 4 bytes), None if plain."""
        self.local = PoolBlocks(kv, KVLayout.of(kv, layout.namespace))
        local = self.local.layout
        if any(count != local.num_kv_heads for _, count in heads) or heads[0][0] != 0:
            raise ValueError(f"rank 0 holds {local.num_kv_heads} KV heads from 0; the ranks hold {list(heads)}")
        covered = sorted({h for start, count in heads for h in range(start, start + count)})
        if covered != list(range(layout.num_kv_heads)):
            raise ValueError(f"the ranks' KV heads {list(heads)} do not cover the {layout.num_kv_heads} of the layout")
        same = (local.num_layers, local.block_size, local.head_dim, local.dtype)
        if same != (layout.num_layers, layout.block_size, layout.head_dim, layout.dtype):
            raise ValueError(f"rank 0's pool does not match the layout: {local.mismatch(layout, 'pool', 'layout')}")
        if quantized_head_dim is not None and quantized_head_dim + 4 != layout.head_dim:
            raise ValueError(f"a quantized pool's rows are head_dim + 4 bytes; got {layout.head_dim} for {quantized_head_dim}")
        self.layout = layout
        self.device = kv.device
        self.is_cuda = kv.is_cuda
        self.num_blocks = kv.shape[2]
        self._unit = layout.block_layer_bytes  # K + V of one block in one layer (ValueError if mixed)
        self._heads = list(heads)
        self._channel = channel
        self._guard = guard
        self._quantized_head_dim = quantized_head_dim
        # The rank each head is read from: the first that holds it.
        seen: set[int] = set()
        self._readers = []
        for rank, (start, _) in enumerate(heads):
            if start not in seen:
                seen.add(start)
                self._readers.append(rank)

    def gather(self, layer: int, ids: np.ndarray, out: torch.Tensor) -> None:
        local = self.local
        self._read(layer, ids, out, local.payload_bytes(len(ids), layer), lambda buf: local.gather(layer, ids, buf))

    def scatter(self, layer: int, ids: np.ndarray, src: torch.Tensor, after: torch.cuda.Event | None) -> None:
        local = self.local
        self._write(layer, ids, src, local.payload_bytes(len(ids), layer), lambda buf: local.scatter(layer, ids, buf, after))

    def read_blocks(self, ids: np.ndarray, out: torch.Tensor) -> None:
        # Every layer in one operation of the KV group (not one per layer): the tiers
        # store a few blocks at a time, and each operation costs a few gloo round trips.
        local = self.local
        self._read(ALL_LAYERS, ids, out, local.block_bytes * len(ids), lambda buf: local.read_blocks(ids, buf))

    def write_blocks(self, ids: np.ndarray, src: torch.Tensor, after: torch.cuda.Event | None) -> None:
        local = self.local
        self._write(ALL_LAYERS, ids, src, local.block_bytes * len(ids), lambda buf: local.write_blocks(ids, buf, after))

    def _read(
        self, layer: int, ids: np.ndarray, out: torch.Tensor, nbytes: int, mine: Callable[[torch.Tensor], None]
    ) -> None:
        """Every rank's `nbytes` slice of blocks `ids` in `layer` (rank 0's by `mine`),
        joined by heads into `out` (pages of every KV head)."""

        def read() -> tuple[list[torch.Tensor], list[int]]:
            return self._channel.read(layer, ids, nbytes, mine)

        slices, failed = self._guard(read)
        if failed:
            raise RuntimeError(f"tensor-parallel rank(s) {failed} could not read their KV heads (see their log)")
        pages = self._pages(layer, len(ids))
        whole = self._parts(self._typed(out, pages, self.layout.num_kv_heads))
        for rank in self._readers:
            start, heads = self._heads[rank]
            mine_parts = self._parts(self._typed(slices[rank], pages, heads))
            for w, m in zip(whole, mine_parts, strict=True):
                w[..., start : start + heads, :].copy_(m)

    def _write(
        self, layer: int, ids: np.ndarray, src: torch.Tensor, nbytes: int, mine: Callable[[torch.Tensor], None]
    ) -> None:
        """Split `src` (pages of every KV head) by heads into each rank's `nbytes` slice,
        and have every rank write its slice of blocks `ids` in `layer` (rank 0 by `mine`)."""
        pages = self._pages(layer, len(ids))
        whole = self._parts(self._typed(src, pages, self.layout.num_kv_heads))
        slices = []
        for start, heads in self._heads:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            for w, m in zip(whole, self._parts(self._typed(buf, pages, heads)), strict=True):
                m.copy_(w[..., start : start + heads, :])
            slices.append(buf)

        def write() -> list[int]:
            return self._channel.write(layer, ids, slices, mine)

        failed = self._guard(write)
        if failed:
            raise RuntimeError(f"tensor-parallel rank(s) {failed} could not write their KV heads (see their log)")

    def follow_engine(self) -> None:
        # Rank 0's gathers, after its engine's writes; the workers' wait for their own.
        self.local.follow_engine()

    def engine_event(self) -> torch.cuda.Event | None:
        return self.local.engine_event()

    def _pages(self, layer: int, count: int) -> int:
        """Pages (one block's K or V of one layer) in an operation on `count` blocks of
        `layer`: a payload [2, count] of them, or whole blocks [count, layers, 2]."""
        return count * 2 * (self.layout.num_layers if layer == ALL_LAYERS else 1)

    def _typed(self, buf: torch.Tensor, pages: int, heads: int) -> torch.Tensor:
        """Host buffer `buf` (uint8) as `pages` pages [pages, block_size, heads, row] of the
        pool's dtype (a payload's [2, count] or whole blocks' [count, layers, 2] flattened:
        the heads split the same way in every page)."""
        lay = self.layout
        nbytes = self._unit // 2 // lay.num_kv_heads * heads * pages
        return buf[:nbytes].view(lay.torch_dtype).view(pages, lay.block_size, heads, lay.head_dim)

    def _parts(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Views of `t` [pages, block_size, heads, row] with the heads on dim -2 whose
        slices along it are whole heads: `t` itself for a plain pool; the values
        [..., heads, head_dim] and the scales [..., heads, 4 bytes] of a quantized one."""
        dim = self._quantized_head_dim
        if dim is None:
            return [t]
        count, block_size, heads, _ = t.shape
        pages = t.reshape(count, -1)
        split = block_size * heads * dim
        values = pages[:, :split].view(count, block_size, heads, dim)
        scales = pages[:, split:].view(count, block_size, heads, 4)
        return [values, scales]
