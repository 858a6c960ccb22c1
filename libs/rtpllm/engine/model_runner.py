"""Runs the model for one scheduled step: packs the batch, calls the model (or replays a
CUDA graph: the whole step for a pure decode step, pieces around attention for a step with
prefill tokens when mixed-step graphs are on), returns the logits the sampler needs (and
prompt-logprob logits when asked). With `enable_features` (speculative EAGLE heads) it
also returns every packed row's hidden-state features (`DecoderLM.feature_layers`).

Tensor parallelism: rank 0's runner sends each packed batch to the other ranks
(`StepSender`) before running it; their runners run the same batch through `run_batch`,
so every collective inside the model meets its partners (docs/tensor_parallel.md)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from rtpllm.attention import AttentionBackend, AttentionMetadata, decode_spans
from rtpllm.attention.backend import longest_first
from rtpllm.engine.cuda_graphs import DecodeGraphs
from rtpllm.engine.multimodal import MultimodalRunner, Splice
from rtpllm.engine.piecewise_graphs import PiecewiseGraphs
from rtpllm.engine.request import PLACEHOLDER
from rtpllm.engine.scheduler import ScheduledRequest, SchedulerOutput
from rtpllm.kvcache.block_manager import BlockManager
from rtpllm.kvcache.kv_pool import KVPool
from rtpllm.models import DecoderLM


@dataclass
class HostBatch:
    """A step's inputs on the host (numpy), before they go to the device."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64; [3, T] M-RoPE positions when a step has them
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B + 1] int32
    seq_lens: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, max_blocks] int32
    sample_indices: np.ndarray  # [S] int64: packed index of each sampling row's last token
    sample_items: list[ScheduledRequest]
    # Per request asking for prompt logprobs: (item, first prompt position, token-axis slice).
    prompt_logprob_spans: list[tuple[ScheduledRequest, int, slice]] = field(default_factory=list)
    num_decodes: int = 0
    # Packed positions whose input token is still on the device, and its row there.
    placeholder_idx: list[int] = field(default_factory=list)
    placeholder_rows: list[int] = field(default_factory=list)
    # Image embeddings replacing placeholder tokens' (multimodal prefill).
    splice: Splice | None = None
    # Decode rows that are a verify step's tokens (after the plain decodes): rows of one
    # sequence, which attend to each other's K/V (AttentionMetadata.decode_rows_share_seqs).
    verify_rows: int = 0
    # With verify rows: where each sequence's decode rows start ([num_decodes] int32,
    # AttentionMetadata.decode_spans), so its KV is read once for all of them.
    decode_spans: np.ndarray | None = None

    @property
    def is_pure_decode(self) -> bool:
        return self.num_decodes == len(self.seq_lens)

    @property
    def is_plain(self) -> bool:
        """No image embeddings and 1-D positions: what a captured decode graph runs."""
        return self.splice is None and self.positions.ndim == 1


@dataclass
class BatchLogits:
    """The logits one packed batch asked for: every token's (a logits observer), the
    sampling rows', and each prompt-logprob span's."""

    all_tokens: torch.Tensor | None
    samples: torch.Tensor
    spans: list[torch.Tensor]
    # Every packed row's features (rows in packed order), when the runner captures them.
    features: torch.Tensor | None = None


class StepSender(Protocol):
    """Rank 0 of a tensor-parallel engine: hands each batch to the other ranks."""

    def send(
        self,
        batch: HostBatch,
        spans: list[slice],
        observe: bool,
        use_graph: bool,
        fill: Callable[[torch.Tensor], None] | None,
    ) -> Callable[[torch.Tensor], None] | None: ...

    def failure(self, exc: BaseException) -> Exception:
        """A step failed on rank 0 after it was sent: end the group; the error to raise."""
        ...


@dataclass
class ModelOutput:
    # [num sampling rows, vocab]: float32, or the model's dtype with `native_logits`
    logits: torch.Tensor
    sample_items: list[ScheduledRequest]
    prompt_logits: list[tuple[ScheduledRequest, int, torch.Tensor]]
    # [packed rows, width]: the features of every packed row (`enable_features`), in the
    # order `prepare` packs them (each scheduled item's rows in turn); None when off.
    # A view of a graph's static buffer on the graph path: valid until the next step.
    features: torch.Tensor | None = None


def _pad_rows(rows: list[list[int]]) -> np.ndarray:
    """Block tables as one zero-padded int32 array, filled in three numpy calls (not one
    per row: this runs every step for up to hundreds of sequences)."""
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lens.sum()))
    out = np.zeros((len(rows), int(lens.max())), dtype=np.int32)
    out[np.arange(out.shape[1]) < lens[:, None]] = flat
    return out


def _span_slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The cache slots of positions start..end-1 of a sequence with block table `table`,
    by numpy (a prompt chunk is thousands of positions, and a Python loop over them is
    host time before the step's first kernel: ~0.55 ms against ~0.2 for 4,096)."""
    first, last = start // block_size, (end - 1) // block_size + 1
    blocks = np.asarray(table[first:last], dtype=np.int64) * block_size
    offset = first * block_size
    return (blocks[:, None] + np.arange(block_size)).ravel()[start - offset : end - offset].tolist()


# Called with the step and the logits of every packed token (debugging / reference tests).
LogitsObserver = Callable[[SchedulerOutput, torch.Tensor], None]


@dataclass
class PrevTokens:
    """The previous step's sampled tokens, still on the device, and each request's row.

    With async scheduling a step is launched before the previous one's tokens reach the
    host; its inputs for those tokens are copied on the device from here.
    """

    tokens: torch.Tensor
    rows: dict[str, int]


class ModelRunner:
    def __init__(
        self,
        model: DecoderLM,
        kv_pool: KVPool,
        block_manager: BlockManager | None,
        backend: AttentionBackend,
        device: str,
        multimodal: MultimodalRunner | None = None,
        tp: StepSender | None = None,
    ) -> None:
        """`block_manager` is None on the worker ranks of a tensor-parallel engine (they
        run batches rank 0 packed); `tp` is rank 0's sender to them."""
        self.model = model
        self.multimodal = multimodal
        self.kv_pool = kv_pool
        self.kv_caches = kv_pool.layer_caches()
        self.blocks = block_manager
        self.backend = backend
        self.device = device
        self.block_size = kv_pool.block_size
        self.logits_observer: LogitsObserver | None = None
        self.graphs: DecodeGraphs | None = None
        self.verify_graphs: DecodeGraphs | None = None
        self.mixed_graphs: PiecewiseGraphs | None = None
        self.tp = tp
        self.capture_features = False
        # The sampling rows' logits in the model's dtype, not float32: the engine's
        # sampler casts them only when it needs more than a greedy argmax (which is the
        # same on bf16, whose float32 values are exact). Set before enable_cuda_graphs.
        # Prompt-logprob and observed logits stay float32.
        self.native_logits = False

    def enable_features(self) -> None:
        """Return every packed row's features from each step (the model's
        `feature_layers`, for a speculative head). Set once at engine start, before
        `enable_cuda_graphs`: the graphs then write them to a static output too."""
        if self.tp is not None:
            raise ValueError("hidden-state features (EAGLE heads) are not supported with tensor parallelism")
        self.capture_features = True

    def enable_cuda_graphs(
        self,
        max_batch: int,
        max_seq_len: int,
        max_verify_rows: int = 0,
        max_verify_span: int = 1,
        max_mixed_tokens: int = 0,
    ) -> None:
        """Capture decode graphs of up to `max_batch` rows, verify-step graphs of up to
        `max_verify_rows` rows in groups of up to `max_verify_span` per sequence, and
        piecewise graphs of the other steps of up to `max_mixed_tokens` tokens (CUDA with
        a graph-safe attention backend only; no mixed-step graphs while the runner
        returns features)."""
        if not self.device.startswith("cuda") or not self.backend.supports_cuda_graphs:
            return
        self.graphs = self._capture(max_batch, max_seq_len, verify=False)
        if max_verify_rows:
            self.verify_graphs = self._capture(max_verify_rows, max_seq_len, verify=True, verify_span=max_verify_span)
        if max_mixed_tokens and not self.capture_features:
            self.mixed_graphs = PiecewiseGraphs(
                self.model, self.kv_caches, self.backend, max_tokens=max_mixed_tokens, device=self.device,
                memory_pool=self.graphs.pool,
            )  # fmt: skip
            self.mixed_graphs.capture()

    def _capture(self, max_batch: int, max_seq_len: int, verify: bool, verify_span: int = 1) -> DecodeGraphs:
        graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.backend,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            block_size=self.block_size,
            scratch_block=self.kv_pool.scratch_block,
            device=self.device,
            verify=verify,
            verify_span=verify_span,
            memory_pool=self.graphs.pool if self.graphs is not None else None,
            features=self.capture_features,
            native_logits=self.native_logits,
        )
        graphs.capture()
        return graphs

    def prepare(self, step: SchedulerOutput, prev: PrevTokens | None = None) -> HostBatch:
        assert self.blocks is not None, "a worker rank runs batches packed by rank 0"
        bs = self.block_size
        ph_idx: list[int] = []
        ph_rows: list[int] = []
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_idx: list[int] = []
        sample_items: list[ScheduledRequest] = []
        spans: list[tuple[ScheduledRequest, int, slice]] = []
        verify_rows = 0
        groups: list[int] = []  # rows of each sequence, while the rows are decode rows
        for item in step.scheduled:
            req = item.request
            start, end = item.start, item.start + item.num_new_tokens
            table = self.blocks.block_table(req.request_id)
            base = len(ids)
            if item.draft:
                # Speculative: the last accepted token then the drafts, each its own
                # decode row reading the context up to itself. Every row's K/V is stored
                # before any row attends, so row j sees drafts 0..j-1 of this step: the
                # same attention as an extend row, run by the decode kernel, so a verify
                # step is a pure decode step a captured graph replays.
                ids.extend(req.all_token_ids[start : end - len(item.draft)])
                ids.extend(item.draft)
                positions.extend(range(start, end))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
                sample_idx.extend(range(base, len(ids) - 1))  # the last row below, as any sampling row
                qsl.extend(range(base + 1, len(ids)))
                seq_lens.extend(range(start + 1, end))
                tables.extend([table] * (end - start - 1))
                verify_rows += end - start
                groups.append(end - start)
            elif end - start == 1:
                groups.append(1)
                token = req.all_token_ids[start]
                if token == PLACEHOLDER:
                    if prev is None or req.request_id not in prev.rows:
                        raise RuntimeError(f"request {req.request_id}: input token not sampled yet")
                    ph_idx.append(len(ids))
                    ph_rows.append(prev.rows[req.request_id])
                ids.append(token)
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                ids.extend(req.all_token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend(_span_slots(table, start, end, bs))
            qsl.append(len(ids))
            seq_lens.append(end)
            tables.append(table)
            if item.samples:
                sample_idx.append(len(ids) - 1)
                sample_items.append(item)
            if req.params.prompt_logprobs is not None:
                # Logits at position p score prompt token p + 1.
                last = min(end, req.num_prompt_tokens - 1)
                first = max(start, req.prompt_logprobs_done)
                if first < last:
                    spans.append((item, first, slice(base + first - start, base + last - start)))
        num_decodes = step.num_decodes + verify_rows  # verifies follow the decodes
        row_groups = np.asarray(decode_spans(groups)[:num_decodes], dtype=np.int32) if verify_rows else None
        table_arr = _pad_rows(tables)
        pos_arr = np.asarray(positions, dtype=np.int64)
        splice = None
        if self.multimodal is not None and self.multimodal.active:
            pos_arr, splice = self.multimodal.apply(step, pos_arr)
        return HostBatch(
            input_ids=np.asarray(ids, dtype=np.int64),
            positions=pos_arr,
            slot_mapping=np.asarray(slots, dtype=np.int64),
            query_start_loc=np.asarray(qsl, dtype=np.int32),
            seq_lens=np.asarray(seq_lens, dtype=np.int32),
            block_tables=table_arr,
            sample_indices=np.asarray(sample_idx, dtype=np.int64),
            sample_items=sample_items,
            prompt_logprob_spans=spans,
            num_decodes=num_decodes,
            verify_rows=verify_rows,
            decode_spans=row_groups,
            placeholder_idx=ph_idx,
            placeholder_rows=ph_rows,
            splice=splice,
        )

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput, prev: PrevTokens | None = None) -> ModelOutput:
        batch = self.prepare(step, prev)
        fill = self._placeholder_fill(batch, prev)
        spans = [span for _, _, span in batch.prompt_logprob_spans]
        observe = self.logits_observer is not None
        use_graph = self.fits_graph(batch, observe)
        if self.tp is None:
            out = self.run_batch(batch, fill, spans, observe, use_graph)
        else:
            fill = self.tp.send(batch, spans, observe, use_graph, fill)
            try:
                out = self.run_batch(batch, fill, spans, observe, use_graph)
            except Exception as exc:
                # The ranks no longer agree on which collective comes next.
                raise self.tp.failure(exc) from exc
        if self.logits_observer is not None and out.all_tokens is not None:
            self.logits_observer(step, out.all_tokens)
        prompt_logits = [
            (item, first, logits) for (item, first, _), logits in zip(batch.prompt_logprob_spans, out.spans, strict=True)
        ]
        return ModelOutput(out.samples, batch.sample_items, prompt_logits, out.features)

    def _graphs_for(self, batch: HostBatch) -> DecodeGraphs | None:
        return self.verify_graphs if batch.verify_rows else self.graphs

    def fits_graph(self, batch: HostBatch, observe: bool) -> bool:
        """Whether a captured graph can run this batch (rank 0 decides for all ranks)."""
        graphs = self._graphs_for(batch)
        return (
            graphs is not None
            and batch.is_pure_decode
            and batch.is_plain
            and not observe
            and len(batch.sample_indices) == len(batch.seq_lens)  # a graph returns every row's logits
            and graphs.can_run(len(batch.seq_lens), batch.block_tables.shape[1], _max_span(batch))
        )

    @torch.inference_mode()
    def run_batch(
        self,
        batch: HostBatch,
        fill: Callable[[torch.Tensor], None] | None,
        spans: list[slice],
        observe: bool,
        use_graph: bool,
    ) -> BatchLogits:
        """Run a packed batch: a decode graph's replay or the eager forward, then the LM
        head for every token (`observe`), the sampling rows and each span, in that order.
        Every tensor-parallel rank runs this with the same arguments: the order of the
        model's collectives is the order of these calls."""
        if use_graph:
            graphs = self._graphs_for(batch)
            assert graphs is not None
            logits, features = graphs.run(
                batch.input_ids, batch.positions, batch.slot_mapping, batch.seq_lens, batch.block_tables, fill,
                batch.decode_spans,
            )  # fmt: skip
            return BatchLogits(None, logits, [], features)
        hidden, features = self._forward_eager(batch, fill)
        compute = self.model.compute_logits
        every = compute(hidden) if observe else None
        samples = compute(hidden[self._upload(batch.sample_indices)], self.native_logits)
        return BatchLogits(every, samples, [compute(hidden[span]) for span in spans], features)

    def _upload(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.startswith("cuda"):
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _placeholder_fill(self, batch: HostBatch, prev: PrevTokens | None) -> Callable[[torch.Tensor], None] | None:
        """A device-side copy of the previous step's tokens into this step's input ids."""
        if not batch.placeholder_idx or prev is None:
            return None
        idx = self._upload(np.asarray(batch.placeholder_idx, dtype=np.int64))
        rows = self._upload(np.asarray(batch.placeholder_rows, dtype=np.int64))

        def fill(input_ids: torch.Tensor) -> None:
            input_ids.index_copy_(0, idx, prev.tokens.index_select(0, rows))

        return fill

    def _forward_eager(
        self, batch: HostBatch, fill: Callable[[torch.Tensor], None] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's forward over a packed batch: [T, hidden], and [T, width] features
        when the runner captures them."""
        up = self._upload
        meta = self.attention_metadata(batch)
        mixed = self.mixed_graphs
        if mixed is not None and batch.is_plain and mixed.fits(len(batch.input_ids)):
            return mixed.run(batch.input_ids, batch.positions, meta, fill), None
        input_ids = up(batch.input_ids)
        if fill is not None:
            fill(input_ids)
        embeds = None
        if batch.splice is not None:
            embeds = (up(batch.splice[0]), batch.splice[1])
        if self.capture_features:
            return self.model.forward_with_features(input_ids, up(batch.positions), self.kv_caches, meta, embeds)
        return self.model(input_ids, up(batch.positions), self.kv_caches, meta, embeds), None

    def attention_metadata(self, batch: HostBatch) -> AttentionMetadata:
        """The attention metadata of a packed batch (uploaded to the device)."""
        up = self._upload
        qsl_host = batch.query_start_loc.tolist()
        seq_host = batch.seq_lens.tolist()
        order = longest_first(batch.seq_lens[: batch.num_decodes]) if not batch.verify_rows else None
        return AttentionMetadata(
            slot_mapping=up(batch.slot_mapping),
            query_start_loc=up(batch.query_start_loc),
            seq_lens=up(batch.seq_lens),
            block_tables=up(batch.block_tables),
            num_decodes=batch.num_decodes,
            max_query_len=max(b - a for a, b in zip(qsl_host, qsl_host[1:], strict=False)),
            max_seq_len=max(seq_host),
            block_size=self.block_size,
            query_start_loc_host=qsl_host,
            seq_lens_host=seq_host,
            decode_rows_share_seqs=batch.verify_rows > 0,
            decode_spans=up(batch.decode_spans) if batch.decode_spans is not None else None,
            max_decode_span=_max_span(batch),
            num_decode_groups=int(np.count_nonzero(batch.decode_spans)) if batch.decode_spans is not None else 0,
            decode_order=up(order) if order is not None else None,
        )


def _max_span(batch: HostBatch) -> int:
    """The most decode rows one sequence has in the batch (1 without verify rows)."""
    return int(batch.decode_spans.max()) if batch.decode_spans is not None and len(batch.decode_spans) else 1
