"""A step's inputs on their way from rank 0 to the other tensor-parallel ranks.

Rank 0 packs a step (`ModelRunner.prepare`); the others hold no scheduler or block
tables, so they get the packed batch itself: two broadcasts on the control group (gloo,
host memory), a fixed header then one int64 payload of every array. With async
scheduling some input ids are still on rank 0's device when the step launches (the
previous step's samples): rank 0 fills them in on the device, then broadcasts the ids on
the device group, so no rank waits for the host.

Both ends run `ModelRunner.run_batch` on the result with the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from rtpllm.engine.model_runner import HostBatch
from rtpllm.parallel.group import TPGroup

_HEADER = 12
_STOP, _STEP, _SHAPE = 0, 1, 2


@dataclass
class ReceivedStep:
    """What a worker rank runs: `ModelRunner.run_batch(batch, fill, spans, observe, use_graph)`."""

    batch: HostBatch
    spans: list[slice]
    observe: bool
    use_graph: bool
    fill: Callable[[torch.Tensor], None] | None


class StepChannel:
    """Rank 0's `send`/`stop` and the workers' `recv` over a TPGroup."""

    def __init__(self, group: TPGroup) -> None:
        self.group = group

    # -- rank 0 ------------------------------------------------------------------------

    def send(
        self,
        batch: HostBatch,
        spans: list[slice],
        observe: bool,
        use_graph: bool,
        fill: Callable[[torch.Tensor], None] | None,
    ) -> Callable[[torch.Tensor], None] | None:
        """Send a packed batch; returns the fill rank 0 runs it with (the given one,
        followed by the broadcast of the filled ids)."""
        if batch.splice is not None:
            raise RuntimeError("image embeddings are not supported with tensor parallelism")
        tokens, seqs = len(batch.input_ids), len(batch.seq_lens)
        width = batch.block_tables.shape[1]
        pos_rows = 1 if batch.positions.ndim == 1 else batch.positions.shape[0]
        header = np.zeros(_HEADER, dtype=np.int64)
        header[:] = (
            _STEP, tokens, seqs, width, len(batch.sample_indices), len(spans), batch.num_decodes,
            observe, use_graph, fill is not None, pos_rows, batch.verify_rows,
        )  # fmt: skip
        bounds = np.asarray([(s.start, s.stop) for s in spans], dtype=np.int64).reshape(-1)
        # A verify step's row groups ride along (one per decode row), so every rank's
        # attention groups its rows alike.
        groups = batch.decode_spans if batch.decode_spans is not None else np.zeros(0, np.int64)
        payload = np.concatenate(
            [
                batch.input_ids,
                batch.positions.reshape(-1),
                batch.slot_mapping,
                batch.query_start_loc.astype(np.int64),
                batch.seq_lens.astype(np.int64),
                batch.block_tables.astype(np.int64).reshape(-1),
                batch.sample_indices,
                bounds,
                groups.astype(np.int64),
            ]
        )
        self.group.broadcast_control(torch.from_numpy(header))
        self.group.broadcast_control(torch.from_numpy(payload))
        if fill is None:
            return None
        inner = fill

        def fill_and_share(ids: torch.Tensor) -> None:
            inner(ids)
            dist.broadcast(ids[:tokens], src=0, group=self.group.device_group)

        return fill_and_share

    def send_shape(self, num_blocks: int, max_model_len: int) -> None:
        """The KV pool's size and the context length rank 0 settled on."""
        header = np.zeros(_HEADER, dtype=np.int64)
        header[:3] = (_SHAPE, num_blocks, max_model_len)
        self.group.broadcast_control(torch.from_numpy(header))

    def stop(self) -> None:
        self.group.broadcast_control(torch.zeros(_HEADER, dtype=torch.int64))

    # -- worker ranks ------------------------------------------------------------------

    def recv_shape(self) -> tuple[int, int]:
        header = self.group.broadcast_control(torch.empty(_HEADER, dtype=torch.int64)).tolist()
        if header[0] != _SHAPE:
            raise RuntimeError(f"expected the KV pool's shape from rank 0, got message kind {header[0]}")
        return header[1], header[2]

    def recv(self) -> ReceivedStep | None:
        """The next step, or None when rank 0 says stop."""
        header = self.group.broadcast_control(torch.empty(_HEADER, dtype=torch.int64)).tolist()
        kind, tokens, seqs, width, samples, num_spans, decodes, observe, use_graph, filled, pos_rows, verify_rows = (
            header
        )
        if kind == _STOP:
            return None
        if kind != _STEP:
            raise RuntimeError(f"expected a step from rank 0, got message kind {kind}")
        num_groups = decodes if verify_rows else 0
        sizes = [tokens, tokens * pos_rows, tokens, seqs + 1, seqs, seqs * width, samples, 2 * num_spans, num_groups]
        payload = self.group.broadcast_control(torch.empty(sum(sizes), dtype=torch.int64)).numpy()
        parts = np.split(payload, np.cumsum(sizes)[:-1])
        ids, positions, slots, qsl, seq_lens, tables, sample_idx, bounds, groups = parts
        batch = HostBatch(
            input_ids=ids,
            positions=positions if pos_rows == 1 else positions.reshape(pos_rows, tokens),
            slot_mapping=slots,
            query_start_loc=qsl.astype(np.int32),
            seq_lens=seq_lens.astype(np.int32),
            block_tables=tables.astype(np.int32).reshape(seqs, width),
            sample_indices=sample_idx,
            sample_items=[],
            num_decodes=decodes,
            verify_rows=verify_rows,
            decode_spans=groups.astype(np.int32) if verify_rows else None,
        )
        spans = [slice(int(a), int(b)) for a, b in bounds.reshape(-1, 2)]
        fill = None
        if filled:
            device_group = self.group.device_group

            def fill(ids: torch.Tensor) -> None:
                dist.broadcast(ids[:tokens], src=0, group=device_group)

        return ReceivedStep(batch, spans, bool(observe), bool(use_graph), fill)
