"""Runs the model for one scheduled step: packs the batch, calls the model, returns the
logits the sampler needs (and prompt-logprob logits when asked)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rtpllm.attention import AttentionMetadata
from rtpllm.engine.scheduler import ScheduledRequest, SchedulerOutput
from rtpllm.kvcache.block_manager import BlockManager
from rtpllm.kvcache.kv_pool import KVPool
from rtpllm.models import DecoderLM


@dataclass
class ModelInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    # Index (in the packed token axis) of each sampling row's last token.
    sample_indices: torch.Tensor
    sample_items: list[ScheduledRequest]
    # Per request asking for prompt logprobs: (item, first prompt position, token-axis slice).
    prompt_logprob_spans: list[tuple[ScheduledRequest, int, slice]] = field(default_factory=list)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [num sampling rows, vocab] float32
    sample_items: list[ScheduledRequest]
    prompt_logits: list[tuple[ScheduledRequest, int, torch.Tensor]]


# Called with the step and the logits of every packed token (debugging / reference tests).
LogitsObserver = Callable[[SchedulerOutput, torch.Tensor], None]


class ModelRunner:
    def __init__(self, model: DecoderLM, kv_pool: KVPool, block_manager: BlockManager, device: str) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.kv_caches = kv_pool.layer_caches()
        self.blocks = block_manager
        self.device = device
        self.block_size = kv_pool.block_size
        self.logits_observer: LogitsObserver | None = None

    def prepare(self, step: SchedulerOutput) -> ModelInput:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_idx: list[int] = []
        sample_items: list[ScheduledRequest] = []
        spans: list[tuple[ScheduledRequest, int, slice]] = []
        bs = self.block_size
        for item in step.scheduled:
            req = item.request
            start, end = item.start, item.start + item.num_new_tokens
            table = self.blocks.block_table(req.request_id)
            base = len(ids)
            ids.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
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
        max_blocks = max(len(t) for t in tables)
        table_tensor = torch.zeros(len(tables), max_blocks, dtype=torch.int32)
        for i, t in enumerate(tables):
            table_tensor[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=table_tensor.to(dev),
            num_decodes=step.num_decodes,
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:], strict=False)),
            max_seq_len=max(seq_lens),
            block_size=bs,
            query_start_loc_host=qsl,
            seq_lens_host=seq_lens,
        )
        return ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            sample_indices=torch.tensor(sample_idx, dtype=torch.int64, device=dev),
            sample_items=sample_items,
            prompt_logprob_spans=spans,
        )

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> ModelOutput:
        inp = self.prepare(step)
        hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta)
        if self.logits_observer is not None:
            self.logits_observer(step, self.model.compute_logits(hidden))
        logits = self.model.compute_logits(hidden[inp.sample_indices])
        prompt_logits = [
            (item, first, self.model.compute_logits(hidden[span])) for item, first, span in inp.prompt_logprob_spans
        ]
        return ModelOutput(logits=logits, sample_items=inp.sample_items, prompt_logits=prompt_logits)
