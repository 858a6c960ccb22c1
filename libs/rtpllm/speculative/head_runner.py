"""Runs an EAGLE head's pass over its own paged KV: the target runner's packing
(`ModelRunner.prepare`) and attention metadata, then the head's forward with every
packed row's input feature. Eager (no CUDA graphs for the head's passes yet)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtpllm.attention import AttentionBackend
from rtpllm.engine.model_runner import ModelRunner, PrevTokens
from rtpllm.engine.scheduler import ScheduledRequest, SchedulerOutput
from rtpllm.kvcache.block_manager import BlockManager
from rtpllm.kvcache.kv_pool import KVPool
from rtpllm.models.eagle import EagleHead


@dataclass
class HeadOutput:
    logits: torch.Tensor  # [sampling rows, vocab] float32
    hidden: torch.Tensor  # [sampling rows, hidden]: the rows' output states (next features)
    sample_items: list[ScheduledRequest]


class HeadRunner(ModelRunner):
    """A `ModelRunner` whose model is an EAGLE head (its pool has the head's one layer)."""

    def __init__(self, head: EagleHead, pool: KVPool, blocks: BlockManager, backend: AttentionBackend, device: str) -> None:
        super().__init__(head, pool, blocks, backend, device)  # type: ignore[arg-type]  (packing only needs the pool)
        self.head = head

    @torch.inference_mode()
    def run(self, step: SchedulerOutput, features: torch.Tensor, from_target: bool, prev: PrevTokens | None = None) -> HeadOutput:
        """One pass: `features` has a row per packed token, in packing order (each
        scheduled item's rows in turn). Returns the sampling rows' logits and states."""
        batch = self.prepare(step, prev)
        assert features.shape[0] == len(batch.input_ids), (features.shape, len(batch.input_ids))
        meta = self.attention_metadata(batch)
        input_ids = self._upload(batch.input_ids)
        fill = self._placeholder_fill(batch, prev)
        if fill is not None:
            fill(input_ids)
        hidden = self.head(input_ids, features, self._upload(batch.positions), self.kv_caches, meta, from_target)
        rows = hidden[self._upload(batch.sample_indices)]
        return HeadOutput(self.head.compute_logits(rows), rows, batch.sample_items)
