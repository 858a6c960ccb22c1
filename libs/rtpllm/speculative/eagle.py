"""EAGLE-head proposer (`--speculative eagle:PATH`): a one-layer head that reads the
target's hidden states guesses the next k tokens of every drafting request of a step,
in k batched head passes (layouts and the head's math: models/eagle_config.py,
models/eagle.py; docs/speculative_decoding.md, "EAGLE heads").

Features. The target returns the features the head reads for every row it computes
(`DecoderLM.set_feature_layers`, set once at start); after each step the engine hands
the rows of requests that may speculate to `observe_features`, only the accepted ones
of a verified request. They wait in a `FeatureStore` until the head next proposes for
the request.

The head's sequence. Head row j takes the target's token at position j + 1 and the
feature of position j, so with N tokens known (the last one sampled, not yet run by
the target) the head can run rows up to N - 2 on the target's own features: its
catch-up rows. Their KV stays in the head's pool between steps (`ProposerKV`); rows
run on the head's guessed features (drafts) are dropped at the next proposal, even
when the drafts were accepted, and run again on the target's features. A head
sequence may start after target position 0 (`DraftSeq.offset`): where the target's
prefix cache served a prompt it computed no features there, so the head's context
starts at the first row it has (RoPE depends on position differences only, so the head
runs at positions counted from that start). A head whose sequence or pending rows were
dropped for room starts again the same way.

Passes (draft_passes.py, shared with the draft model): pass 1 runs every request's
catch-up rows and draws draft 1 from the last row; pass j (2..k) feeds draft j-1 with
the previous pass's output state as its feature and draws draft j. Greedy requests take
the argmax; sampled ones draw from the processed distribution q, which verification
receives with the drafts. Head passes run eagerly (no CUDA graphs yet).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from rtpllm.attention import AttentionBackend, get_backend
from rtpllm.config import EngineConfig, parse_dtype
from rtpllm.engine.model_runner import PrevTokens
from rtpllm.engine.request import Request
from rtpllm.engine.scheduler import SchedulerOutput
from rtpllm.kvcache.kv_format import KVCacheSpec
from rtpllm.loader import CheckpointError, load_checkpoint_fast, safetensors_files
from rtpllm.loader.safetensors_header import read_header
from rtpllm.loader.torch_bin import has_torch_bin, load_torch_bin, read_torch_bin
from rtpllm.models import DecoderLM, ModelConfig
from rtpllm.models.eagle import EagleHead, TargetParts, build_eagle_head
from rtpllm.models.eagle_config import EagleConfig
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative.adaptive import PassCost, StepCostModel
from rtpllm.speculative.draft_passes import DraftStats, Work, collect_works, run_passes
from rtpllm.speculative.feature_store import FeatureSpan, FeatureStore
from rtpllm.speculative.head_runner import HeadRunner
from rtpllm.speculative.proposer import NO_PROPOSAL, FeatureRows, Proposal, Proposer
from rtpllm.speculative.proposer_kv import DraftSeq, ProposerKV

log = logging.getLogger(__name__)

_NAMESPACE = b"rtpllm-eagle-head"
_SEQ_PARAMS = SamplingParams(max_tokens=None)
# Pending feature rows the store holds, in steps' worth of tokens (--max-num-batched-tokens).
STORE_STEPS = 4


class EagleProposer(Proposer):
    """Proposes with an EAGLE / EAGLE-3 head; see the module docstring. Built in two
    stages like the draft model: `load` (weights, the feature store), then
    `allocate_kv` (the head's pool, from its share of the KV budget)."""

    name = "eagle"

    def __init__(self, head: EagleHead, backend: AttentionBackend, config: EngineConfig, target: ModelConfig, max_len: int) -> None:
        self.head = head
        self.head_config = head.config
        self.backend = backend
        self.device = config.device
        self.dtype = parse_dtype(config.dtype, config.device)
        self.max_len = max_len
        self.max_pass_tokens = config.scheduler.max_num_batched_tokens
        self.feature_layers = head.config.feature_layers(target)
        width = target.hidden_size * len(self.feature_layers)
        self.features = FeatureStore(STORE_STEPS * config.scheduler.max_num_batched_tokens, width, self.dtype, self.device)
        layer = head.config.layer
        self.kv = ProposerKV(
            layer,
            config.cache.block_size,
            self.dtype,
            self.device,
            KVCacheSpec.resolve(layer.num_layers, self.dtype, config.cache.kv_cache_dtype),
            _NAMESPACE,
            False,  # the head's KV depends on where its context starts: no prefix cache
            "EAGLE head",
        )
        self._generator = torch.Generator(device=torch.device(self.device))
        self._generator.manual_seed(config.seed + 2)  # unseeded sampled requests' draws
        self._cost = StepCostModel()
        self.stats = DraftStats()
        self._last: dict[str, torch.Tensor] = {}  # within a call: each live request's last output state

    @classmethod
    def load(cls, config: EngineConfig, target_config: ModelConfig, target: DecoderLM, max_len: int) -> EagleProposer:
        """Read the head at `config.speculative.draft_model`, check it against the target
        (ValueError naming what does not fit) and load its weights."""
        path = config.speculative.draft_model
        assert path is not None
        head_dir = Path(path)
        if not (head_dir / "config.json").is_file():
            raise ValueError(f"EAGLE head {path!r}: not a directory with a config.json (eagle:PATH takes a local EAGLE checkpoint)")
        if config.tensor_parallel_size > 1:
            raise ValueError("EAGLE heads are not supported with tensor parallelism (--tensor-parallel-size > 1)")
        source = f"EAGLE head {path!r}"
        raw = json.loads((head_dir / "config.json").read_text())
        EagleConfig.check_config(raw, source)
        head_config = EagleConfig.from_checkpoint(raw, _tensor_shapes(head_dir), source)
        head_config.check_target(target_config, repr(path), repr(config.model))
        dtype = parse_dtype(config.dtype, config.device)
        backend = get_backend(config.attention_backend, config.device)
        head = build_eagle_head(head_config, backend, max_len, dtype, config.device)
        if config.load_format == "dummy":
            head.fill_random(config.seed + 3)
        else:
            targets, ignore = head.checkpoint_targets(), head.ignores_checkpoint_tensor
            try:
                if _has_safetensors(head_dir):
                    stats = load_checkpoint_fast(head_dir, targets, ignore=ignore)  # type: ignore[arg-type]
                else:
                    stats = load_torch_bin(head_dir, targets, ignore=ignore)  # type: ignore[arg-type]
            except CheckpointError as exc:
                raise ValueError(f"EAGLE head {path!r}: {exc}") from None
            log.info("EAGLE head (%s): loaded %d tensors (%.2f MB) in %.2f s", head_config.kind, stats.num_tensors, stats.bytes_read / 1e6, stats.seconds)
        head.finish_loading()
        head.share_target(TargetParts(target.embed_tokens, target.compute_logits))
        return cls(head, backend, config, target_config, max_len)

    # -- memory ----------------------------------------------------------------------

    @property
    def bytes_per_block(self) -> int:
        return self.kv.bytes_per_block

    def allocate_kv(self, num_blocks: int) -> None:
        self.kv.allocate(num_blocks, lambda pool, blocks: HeadRunner(self.head, pool, blocks, self.backend, self.device))

    def enable_cuda_graphs(self, max_batch: int) -> None:
        """The head's passes run eagerly (one layer; capturing them is future work)."""

    def reset(self) -> None:
        """Forget every sequence, pending feature and measured pass time (after the
        engine's warm-up)."""
        self.kv.reset()
        self.features.clear()
        self._cost = StepCostModel()
        self.stats = DraftStats()

    # -- the Proposer interface ------------------------------------------------------

    def observe_features(self, rows: Sequence[FeatureRows], features: torch.Tensor) -> None:
        spans = []
        for r in rows:
            seq = self.kv.seqs.get(r.request.request_id)
            floor = seq.offset + seq.synced if seq is not None else 0
            spans.append(FeatureSpan(r.request.request_id, r.position, r.row, r.count, floor))
        self.features.add(spans, features)

    def recover(self) -> None:
        """After a failed proposal: every head sequence is dropped; each starts again
        from its next pending features."""
        self.kv.drop_all()

    @property
    def pass_cost(self) -> StepCostModel:
        """Measured seconds of one head pass by the rows in it."""
        return self._cost

    def cost(self, requests: Sequence[Request]) -> PassCost:
        """Pass 1 of a request carries its pending rows (one after a plain step, one plus
        the accepted drafts after a verification); a request not seen yet counts one:
        its prompt's rows are a one-time cost, as the target's prefill is."""
        first = []
        for req in requests:
            count = self.features.pending(req.request_id)[1]
            first.append(count if req.request_id in self.kv.seqs and count else 1)
        return PassCost(self._cost, first)

    def propose(self, request_id: str, tokens: Sequence[int], k: int, private: bool = False) -> Proposal:
        """No proposal for a bare token sequence: the head needs the target's features,
        which only the engine's steps produce (it calls `propose_batch`)."""
        return NO_PROPOSAL

    def forget(self, request_id: str, output_tokens: Sequence[int] | None = None) -> None:
        self.kv.drop(request_id)
        self.features.drop(request_id)

    @torch.inference_mode()
    def propose_batch(self, batch: Sequence[tuple[Request, int]]) -> list[Proposal]:
        assert self.kv.blocks is not None, "allocate_kv first"
        self.kv.tick += 1
        works = collect_works(batch, self.max_len, self.max_pass_tokens, self._prepare)
        proposals = [NO_PROPOSAL] * len(batch)
        if works:
            self._last = {}
            try:
                done = run_passes(works, self._forward, self._generator, self._cost, self.stats, self.device.startswith("cuda"))
            finally:
                self._last = {}
            for work in works:
                work.seq.synced += work.feed  # those rows ran on the target's features
            for work, proposal in zip(works, done, strict=True):
                proposals[work.index] = proposal
        return proposals

    def _forward(self, step: SchedulerOutput, prev: PrevTokens | None, live: list[Work], depth: int) -> torch.Tensor:
        """One head pass (run_passes): pass 1 on the target's pending features, later
        passes on each request's previous output state."""
        assert self.kv.runner is not None
        runner = self.kv.runner
        assert isinstance(runner, HeadRunner)
        if depth == 1:
            features = self.features.take([(i.request.request_id, i.num_new_tokens) for i in step.scheduled])
        else:
            features = torch.cat([self._last[i.request.request_id] for i in step.scheduled])
        out = runner.run(step, features, depth == 1, prev)
        rows = {item.request.request_id: r for r, item in enumerate(out.sample_items)}
        index = torch.tensor([rows[w.seq.req.request_id] for w in live], dtype=torch.long, device=out.logits.device)
        hidden = out.hidden[index]
        self._last = {w.seq.req.request_id: hidden[r : r + 1] for r, w in enumerate(live)}
        return out.logits[index]

    # -- sequences -------------------------------------------------------------------

    def _prepare(self, index: int, req: Request, k: int, budget: int, protect: set[str]) -> Work | None:
        """Line the request's head sequence up with its pending features (rows from
        where the head's context ends to N - 2) and give it the blocks this call writes;
        None without features for its newest row, or without room."""
        blocks = self.kv.blocks
        assert blocks is not None
        rid = req.request_id
        first, count = self.features.pending(rid)
        if count == 0 or first + count != req.num_tokens - 1:
            return None  # the head lacks the newest target features (dropped for room)
        seq = self.kv.seqs.get(rid)
        if seq is not None and seq.offset + seq.synced != first:
            self.kv.drop(rid)  # a gap: its context cannot continue
            seq = None
        if seq is None:
            inner = Request(request_id=rid, prompt_token_ids=[], params=_SEQ_PARAMS)
            seq = DraftSeq(inner, 0, offset=first)
        else:
            # Rows past the real ones ran on guessed features (last call's drafts).
            del seq.req.all_token_ids[seq.synced :]
            seq.req.num_computed_tokens = seq.synced
        feed = min(count, budget)
        done = feed == count
        # Head row j (target position p = offset + j) takes the token at p + 1.
        seq.req.all_token_ids.extend(req.all_token_ids[first + 1 : first + 1 + feed])
        # Positions written: the catch-up rows, then drafts 1..k-1 (draft k is not fed).
        need = seq.synced + feed + (k - 1 if done else 0)
        if blocks.has_table(rid):
            blocks.truncate(rid, need)
        fitted, dropped = self.kv.allocate_seq(seq.req, need, None, protect)
        self.stats.dropped += dropped
        if not fitted:
            if rid not in self.kv.seqs and blocks.has_table(rid):
                blocks.free(rid)  # the empty table of a new sequence
            return None  # a kept sequence's unrun rows are trimmed next time
        self.kv.seqs[rid] = seq
        seq.last_used = self.kv.tick
        return Work(index, req, seq, k if done else 0, feed)


def _has_safetensors(head_dir: Path) -> bool:
    return any(head_dir.glob("*.safetensors"))


def _tensor_shapes(head_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape (safetensors headers, else pytorch_model.bin)."""
    try:
        if _has_safetensors(head_dir):
            return {t.name: t.shape for path in safetensors_files(head_dir) for t in read_header(path).tensors}
        if has_torch_bin(head_dir):
            return {name: tuple(t.shape) for name, t in read_torch_bin(head_dir).items()}
    except CheckpointError as exc:
        raise ValueError(f"EAGLE head {str(head_dir)!r}: {exc}") from None
    raise ValueError(f"EAGLE head {str(head_dir)!r}: no *.safetensors or pytorch_model.bin")
