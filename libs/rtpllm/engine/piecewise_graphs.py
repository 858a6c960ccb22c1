"""Steps with prefill tokens replayed from CUDA graphs in pieces, attention run eagerly
between them.

A decode step's attention has one launch shape per batch size, so cuda_graphs.py
captures the whole step. A step that mixes a prefill chunk with decodes does not: its
attention launches depend on how the tokens split into sequences (the extend kernel's
grid, SDPA for a lone prompt, host-side lengths). Everything else in the model works
token by token with fixed shapes: norms, projections, RoPE, the MLP, the tensor-parallel
all-reduce. So the forward is captured in pieces that end at each attention call:

    piece 0      embedding, layer 0 up to its attention (norm, qkv projection, RoPE)
    piece i      the rest of layer i - 1 (o_proj, residual, MLP), layer i up to attention
    piece L      the rest of the last layer, the final norm

and a step replays piece 0, runs layer 0's attention eagerly on the q/k/v the piece left
in its own output (storing the step's K/V as any eager step does) into a static buffer
the next piece reads, replays piece 1, and so on. The logits of the sampling rows are
computed eagerly from the last piece's output, as on the eager path.

Pieces are captured per token count on a ladder (16, 32, ..., 256, 288, ... up to the
step budget: `token_ladder`); a step of T tokens replays the smallest size >= T with the
extra rows padded. Attention and the KV cache see only the real rows; padded rows pass
through per-token ops alone, so they cannot change a real row's result.

Capture ends and begins pieces from inside the model's forward: while the model is
captured, every layer's attention backend is swapped for a `_Cut`, which records where
the piece leaves q/k/v (aliases of the graph pool's memory: the qkv projection's output,
rotated in place), ends the piece being captured, records the layer's call (its caches,
scale, window) and begins the next piece. Nothing in the model changes for this.

The q/k/v are read where the piece wrote them, not copied out: copies into static
buffers took 3 launches a layer (q, k and v are strided views of the qkv output), and
the attention's output is written straight into the static buffer the next piece reads
instead of copied there. On an H100 a 4,096-token 8B prefill spent 3.7 ms of its 95.5
in copies around attention, five a layer, four of them these (docs/benchmarks.md,
"Mixed-step graph pieces without the copies"). The aliases do not keep the memory
allocated: once attention has read them the next piece may reuse it, which is safe
because the pieces replay in the order they were captured, one step at a time.

Why: eager, each of a step's ~15 launches per layer costs the CPU several microseconds;
with a small model or a small step the GPU waits on them. Measured on an H100 (8B shape,
2k-token prompts arriving beside 32 decoding streams): decode ITL p99 20.2 ms eager,
13.7 ms with the pieces (docs/benchmarks.md, "Mixed-step CUDA graphs").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rtpllm.attention import AttentionBackend, AttentionMetadata
from rtpllm.config import EngineConfig
from rtpllm.engine.cuda_graphs import pinned
from rtpllm.models import DecoderLM

log = logging.getLogger(__name__)

# The ladder: by 16 up to 256 tokens, where a step is bound by reading the weights and
# padded rows cost little; past that by the largest power of two <= 1/16 of the size
# (288..512 by 32, 576..1024 by 64, ...), so a step pads at most 1/8 of its tokens.
_STEP = 16


def mixed_graph_tokens(config: EngineConfig) -> int:
    """The largest step mixed-step graphs are captured for (0: none): the step budget."""
    on = config.mixed_cuda_graphs if config.mixed_cuda_graphs is not None else config.tensor_parallel_size == 1
    return config.scheduler.max_num_batched_tokens if config.cuda_graphs and on else 0


def token_ladder(max_tokens: int) -> list[int]:
    """The token counts captured for steps of up to `max_tokens` tokens."""
    sizes: list[int] = []
    size = _STEP
    while size < max_tokens:
        sizes.append(size)
        step = _STEP
        while step * 16 <= size:
            step *= 2
        size += step
    return sorted({*sizes, max_tokens})


@dataclass(frozen=True)
class _AttentionCall:
    """One layer's attention call, as the layer makes it, without q/k/v and metadata."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    scale: float
    sliding_window: int | None
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None


@dataclass
class _Bucket:
    pieces: list[torch.cuda.CUDAGraph]
    hidden: torch.Tensor  # the last piece's output: [size, hidden] final-normed states
    qkv: list[tuple[torch.Tensor, ...]]  # per layer: where its piece leaves q, k, v (aliases)


class PiecewiseGraphs:
    def __init__(
        self,
        model: DecoderLM,
        kv_caches: list[tuple[torch.Tensor, ...]],
        backend: AttentionBackend,
        *,
        max_tokens: int,
        device: str,
        memory_pool: tuple[int, int] | None = None,
    ) -> None:
        """`max_tokens`: the largest step captured. `memory_pool`: another set of graphs'
        pool to share (graphs of the two sets never replay interleaved)."""
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.max_tokens = max_tokens
        self.sizes = token_ladder(max_tokens)
        attn = model.layers[0].self_attn
        dev, dtype = torch.device(device), model.embed_tokens.weight.dtype
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        # Attention's output: one for every layer and size, since the layers run one
        # after another.
        self.out = torch.zeros(max_tokens, attn.num_heads, attn.head_dim, dtype=dtype, device=dev)
        self.calls: list[_AttentionCall] = []
        self._buckets: dict[int, _Bucket] = {}
        self._pool = memory_pool
        self.replays = 0  # steps replayed (tests and stats read it)

    def fits(self, num_tokens: int) -> bool:
        return bool(self._buckets) and num_tokens <= self.max_tokens

    def capture(self) -> None:
        """Capture every size, largest first so the smaller ones reuse its memory."""
        pool = self._pool if self._pool is not None else torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        # The static buffers were filled on the current stream (torch.zeros).
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                self._forward(size, _Cut(self, "dry"))  # warm-up: compiles kernels, sizes workspaces
                torch.cuda.synchronize()
                cut = _Cut(self, "capture", pool=pool)
                cut.begin_piece()
                hidden = self._forward(size, cut)
                cut.end_piece()
                self._buckets[size] = _Bucket(cut.pieces, hidden, cut.qkv)
            # Upload every piece now (a graph's first replay does), not in a request's
            # step. Pieces never touch the KV cache: replaying them on stale buffers is safe.
            for bucket in self._buckets.values():
                for piece in bucket.pieces:
                    piece.replay()
        torch.cuda.synchronize()
        self._pool = pool
        log.info("captured mixed-step CUDA graphs (%d pieces each) for token counts %s", len(self.calls) + 1, self.sizes)

    def run(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        meta: AttentionMetadata,
        fill: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """The model's forward over a packed step of T tokens: [T, hidden] final-normed
        hidden states (a view of a static buffer, valid until the next replay). `meta` is
        the step's own (uploaded) metadata; `fill` patches input ids on the device."""
        tokens = len(input_ids)
        size = self._size_for(tokens)
        pad = size - tokens
        ids = np.concatenate([input_ids, np.zeros(pad, np.int64)]) if pad else input_ids
        pos = np.concatenate([positions, np.zeros(pad, np.int64)]) if pad else positions
        self.input_ids[:size].copy_(pinned(ids), non_blocking=True)
        self.positions[:size].copy_(pinned(pos), non_blocking=True)
        if fill is not None:
            fill(self.input_ids[:size])
        bucket = self._buckets[size]
        for piece, call, qkv in zip(bucket.pieces[:-1], self.calls, bucket.qkv, strict=True):
            piece.replay()
            self.attend(call, qkv, meta, tokens)
        bucket.pieces[-1].replay()
        self.replays += 1
        return bucket.hidden[:tokens]

    def run_eager(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """What `run` computes, without graphs: the forward through the same cuts, static
        buffers and padding (any device; the CPU tests check the plumbing with it)."""
        tokens = input_ids.shape[0]
        size = self._size_for(tokens)
        self.input_ids[:size].zero_()
        self.positions[:size].zero_()
        self.input_ids[:tokens].copy_(input_ids)
        self.positions[:tokens].copy_(positions)
        return self._forward(size, _Cut(self, "eager", meta=meta, tokens=tokens))[:tokens]

    def attend(self, call: _AttentionCall, qkv: tuple[torch.Tensor, ...], meta: AttentionMetadata, tokens: int) -> None:
        """One layer's attention over the q/k/v its piece left (`qkv`) for the step's
        `tokens` real rows, into the static output the next piece reads."""
        q, k, v = (t[:tokens] for t in qkv)
        self.backend.forward(
            q, k, v, call.k_cache, call.v_cache, meta, call.scale, call.sliding_window, call.k_scale, call.v_scale,
            out=self.out[:tokens],
        )  # fmt: skip

    def _size_for(self, tokens: int) -> int:
        """The captured token count a step of `tokens` tokens pads to."""
        return next(s for s in self.sizes if s >= tokens)

    def _forward(self, size: int, cut: _Cut) -> torch.Tensor:
        with _attention_through(self.model, cut):
            hidden = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, cut.meta)
        self.calls = cut.calls  # the same layers every time: replays run these
        return hidden


class _Cut(AttentionBackend):
    """Stands in for every layer's attention backend while the model runs in pieces.

    "capture": ends the piece being captured at each attention call and begins the next;
    "dry": runs no attention (the warm-up before a capture); "eager": runs the layer's
    attention on the real rows (PiecewiseGraphs.run_eager).
    """

    name = "piecewise-cut"

    def __init__(
        self,
        graphs: PiecewiseGraphs,
        mode: Literal["capture", "dry", "eager"],
        *,
        pool: tuple[int, int] | None = None,
        meta: AttentionMetadata | None = None,
        tokens: int = 0,
    ) -> None:
        self.graphs = graphs
        self.mode = mode
        self.pool = pool
        self.tokens = tokens
        self.calls: list[_AttentionCall] = []
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.qkv: list[tuple[torch.Tensor, ...]] = []  # "capture": per layer, aliases of q, k, v
        # The model hands this to attention, which is this cut: only "eager" reads it.
        self.meta = meta if meta is not None else _unused_meta(graphs.input_ids)

    def begin_piece(self) -> None:
        piece = torch.cuda.CUDAGraph()
        piece.capture_begin(pool=self.pool)
        self.pieces.append(piece)

    def end_piece(self) -> None:
        self.pieces[-1].capture_end()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert out is None, "the model's layers pass no output buffer"
        g = self.graphs
        call = _AttentionCall(k_cache, v_cache, scale, sliding_window, k_scale, v_scale)
        self.calls.append(call)
        if self.mode == "capture":
            self.qkv.append((_alias(q), _alias(k), _alias(v)))
            self.end_piece()
            self.begin_piece()
        elif self.mode == "eager":
            g.attend(call, (q, k, v), meta, self.tokens)
        return g.out[: q.shape[0]]


def _alias(t: torch.Tensor) -> torch.Tensor:
    """`t`'s elements as a tensor that does not own their memory: holding it does not
    keep the block allocated in the graph pool (as torch's own CUDA graph trees alias
    their outputs). Valid while the pool lives, for what the captured graphs write there."""
    storage = t.untyped_storage()
    alias = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), t.device, storage.nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(alias, t.storage_offset(), t.size(), t.stride())


@contextmanager
def _attention_through(model: DecoderLM, cut: _Cut) -> Iterator[None]:
    attns = [layer.self_attn for layer in model.layers]
    saved = [attn.backend for attn in attns]
    for attn in attns:
        attn.backend = cut
    try:
        yield
    finally:
        for attn, backend in zip(attns, saved, strict=True):
            attn.backend = backend


def _unused_meta(like: torch.Tensor) -> AttentionMetadata:
    """Metadata for a forward whose attention is a `_Cut` that ignores it."""
    empty = like[:0]
    return AttentionMetadata(
        slot_mapping=empty, query_start_loc=empty, seq_lens=empty, block_tables=empty, num_decodes=0,
        max_query_len=0, max_seq_len=0, block_size=1, query_start_loc_host=[], seq_lens_host=[],
    )  # fmt: skip
