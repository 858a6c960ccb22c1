"""The decode step (one new token per sequence) captured as CUDA graphs.

A speculative verify step is one too: the model runner packs each of its k + 1 tokens
as a decode row of its own (rtpllm.engine.model_runner). Those rows need each other's
K/V in the cache before they attend, which the fused store-and-attend decode kernel
does not give, so verify steps replay a second set of graphs captured with
`decode_rows_share_seqs` (the K/V stored first); both sets share one memory pool. Their
attention reads each sequence's KV once for all its rows (the verify kernel), grouped by
`decode_spans`, a per-row input like the others, for groups of up to the `verify_span`
rows (k + 1) they were captured with.

With `features` (a speculative EAGLE head reads the target's hidden states) each graph
also writes the rows' features (`DecoderLM.forward_with_features`) to a static output
beside the logits; without it the captured step is the plain forward.

A graph per batch size on a ladder (1, 2, 4, 8, 16, 24, ... max); a step of B sequences
replays the smallest graph >= B with the extra rows padded: they write their K/V into
the pool's scratch block and their logits are ignored. Inputs live in static device
buffers that are refilled before each replay; the graphs share one memory pool.

Why: at batch 1 an 8B model's step is ~5 ms of GPU work split over ~400 kernel launches;
launched one by one from Python the GPU waits on the CPU between them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rtpllm.attention import AttentionBackend, AttentionMetadata
from rtpllm.attention.backend import longest_first, orders_rows
from rtpllm.config import EngineConfig
from rtpllm.models import DecoderLM

log = logging.getLogger(__name__)


# Past this many rows a step is compute-bound and its launches are a small part of it.
MAX_GRAPH_ROWS = 512


def plain_graph_rows(config: EngineConfig) -> int:
    """The rows the largest decode graph holds: every running sequence, up to 256."""
    return min(config.scheduler.max_num_seqs, 256)


def verify_graph_rows(config: EngineConfig) -> int:
    """The rows the largest verify graph holds (0: the engine does not speculate): every
    running sequence with its k + 1 rows, up to MAX_GRAPH_ROWS."""
    if not config.speculative.method:
        return 0
    return min(config.scheduler.max_num_seqs * (1 + config.speculative.num_speculative_tokens), MAX_GRAPH_ROWS)


def verify_span(config: EngineConfig) -> int:
    """The most decode rows one sequence has in a verify step: its k + 1 tokens."""
    return 1 + config.speculative.num_speculative_tokens if config.speculative.method else 1


def batch_ladder(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch, 8 if max_batch <= 64 else 16))
    return sorted({*sizes, max_batch})


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor
    features: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(
        self,
        model: DecoderLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        backend: AttentionBackend,
        *,
        max_batch: int,
        max_seq_len: int,
        block_size: int,
        scratch_block: int,
        device: str,
        verify: bool = False,
        verify_span: int = 1,
        memory_pool: tuple[int, int] | None = None,
        features: bool = False,
        native_logits: bool = False,
    ) -> None:
        """`verify`: graphs for steps whose decode rows include several tokens of one
        sequence (see the module docstring), up to `verify_span` rows per sequence.
        `memory_pool`: another set's `pool`, to share its memory (the sets never replay
        at once). `features`: also output the rows' hidden-state features (the model's
        `feature_layers`). `native_logits`: output the logits in the model's dtype (see
        `ModelRunner.native_logits`)."""
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_blocks = -(-max_seq_len // block_size)
        self.sizes = batch_ladder(max_batch)
        dev = torch.device(device)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((max_batch, self.max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self.decode_spans = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.decode_order = torch.arange(max_batch, dtype=torch.int32, device=dev)
        self.verify = verify
        self.verify_span = verify_span if verify else 1
        self.features = features
        self.native_logits = native_logits
        self._graphs: dict[int, _Graph] = {}
        self._pool = memory_pool

    @property
    def pool(self) -> tuple[int, int] | None:
        """The graphs' memory pool (after `capture`)."""
        return self._pool

    def capture(self) -> None:
        """Capture every size, largest first so the smaller ones reuse its memory."""
        self._reset_padding(self.max_batch)
        stream = torch.cuda.Stream()
        # The input buffers were filled on the current stream (torch.zeros, the reset
        # above); the capture stream must not read them before those fills ran, or the
        # warm-up forward embeds whatever the allocator's reused memory held.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                with self.backend.graph_capture(size, self.max_seq_len):
                    self._forward(size)  # warm-up: compiles kernels, sizes workspaces
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                        logits, features = self._forward(size)
                    if self._pool is None:
                        self._pool = graph.pool()
                self._graphs[size] = _Graph(graph, logits, features)
            # A graph's first replay uploads it to the device (milliseconds for ~400
            # nodes): do it now, not in a request's step, where it would also make the
            # speculation policy's cost model price that step size too high. The
            # inputs are still the padding: every row writes the scratch block.
            for entry in self._graphs.values():
                entry.graph.replay()
        torch.cuda.synchronize()
        log.info("captured %s CUDA graphs for batch sizes %s", "verify" if self.verify else "decode", self.sizes)

    def _forward(self, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            num_decodes=size,
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            block_size=self.block_size,
            query_start_loc_host=list(range(size + 1)),
            seq_lens_host=[self.max_seq_len] * size,
            decode_rows_share_seqs=self.verify,
            decode_spans=self.decode_spans[:size] if self.verify else None,
            max_decode_span=self.verify_span,
            num_decode_groups=-(-size // self.verify_span),
            decode_order=self.decode_order[:size] if self._ordered(size) else None,
        )
        if self.features:
            hidden, features = self.model.forward_with_features(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
            return self.model.compute_logits(hidden, self.native_logits), features
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
        return self.model.compute_logits(hidden, self.native_logits), None

    def _ordered(self, size: int) -> bool:
        """Whether graphs of `size` rows launch them longest context first (fixed at
        capture: the kernel's grid differs). Verify rows keep their order."""
        return not self.verify and orders_rows(size)

    def _reset_padding(self, size: int) -> None:
        self.input_ids[:size].zero_()
        self.positions[:size].zero_()
        self.slot_mapping[:size].fill_(self.scratch_block * self.block_size)
        self.seq_lens[:size].fill_(1)
        self.block_tables[:size].fill_(self.scratch_block)
        self.decode_spans[:size].fill_(1)
        self.decode_order[:size].copy_(torch.arange(size, dtype=torch.int32, device=self.decode_order.device))

    def can_run(self, batch: int, max_blocks: int, max_span: int = 1) -> bool:
        return batch <= self.max_batch and max_blocks <= self.max_blocks and max_span <= self.verify_span and bool(self._graphs)

    def run(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        seq_lens: np.ndarray,
        block_tables: np.ndarray,
        fill: Callable[[torch.Tensor], None] | None = None,
        decode_spans: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay for a decode batch; returns logits [batch, vocab] and, with `features`,
        the rows' features [batch, width] (views, valid until the next replay). `fill`
        patches the input ids on the device (async scheduling); `decode_spans`: a verify
        step's row groups (None: every row its own)."""
        batch, width = block_tables.shape
        size = next(s for s in self.sizes if s >= batch)
        pad = size - batch
        ids = np.concatenate([input_ids, np.zeros(pad, np.int64)]) if pad else input_ids
        pos = np.concatenate([positions, np.zeros(pad, np.int64)]) if pad else positions
        slots = np.concatenate([slot_mapping, np.full(pad, self.scratch_block * self.block_size, np.int64)]) if pad else slot_mapping
        lens = np.concatenate([seq_lens, np.ones(pad, np.int32)]) if pad else seq_lens
        table = np.full((size, width), self.scratch_block, dtype=np.int32)
        table[:batch] = block_tables
        self.input_ids[:size].copy_(pinned(ids), non_blocking=True)
        self.positions[:size].copy_(pinned(pos), non_blocking=True)
        self.slot_mapping[:size].copy_(pinned(slots), non_blocking=True)
        self.seq_lens[:size].copy_(pinned(lens), non_blocking=True)
        # Columns past `width` keep stale ids; the kernels never read past seq_len.
        self.block_tables[:size, :width].copy_(pinned(table), non_blocking=True)
        if self.verify:
            spans = decode_spans if decode_spans is not None else np.ones(batch, np.int32)
            spans = np.concatenate([spans, np.ones(pad, np.int32)]) if pad else spans
            self.decode_spans[:size].copy_(pinned(spans.astype(np.int32)), non_blocking=True)
        if self._ordered(size):
            order = longest_first(lens)
            assert order is not None
            self.decode_order[:size].copy_(pinned(order), non_blocking=True)
        if fill is not None:
            fill(self.input_ids[:size])
        entry = self._graphs[size]
        entry.graph.replay()
        return entry.logits[:batch], entry.features[:batch] if entry.features is not None else None


def pinned(array: np.ndarray) -> torch.Tensor:
    """`array` copied to pinned host memory, for an asynchronous upload."""
    return torch.from_numpy(np.ascontiguousarray(array)).pin_memory()
