"""Draft-model proposer (`--speculative draft:PATH`): a smaller model with the target's
vocabulary guesses the next k tokens of every drafting request of a step, for the whole
batch at once: one batched forward pass per draft position.

The draft is a small engine of its own: its model, a paged KV pool, a `BlockManager`
(with its own prefix cache) and a `ModelRunner` (decode passes replay CUDA graphs on
CUDA). Every target request has a persistent draft sequence whose KV stays between
steps. At each proposal it is reconciled with the target's tokens: the draft's KV is
kept up to the first position where its tokens differ from the target's (the first
rejected draft), and the tokens after it are fed again. Usually that is one token (the
target's correction) or two (the last draft and the bonus token, after all were
accepted); the first time, the prompt (its full blocks from the draft's prefix cache
when other requests shared them). Then:

- pass 1 runs every request's catch-up tokens (decodes first, then extend rows) and
  yields draft 1 from the last token's logits;
- pass j (2..k) runs draft j-1 of every request drafting at least j tokens, one token
  each (a pure decode batch, so a CUDA graph), and yields draft j. The token fed stays
  on the device (a placeholder in the sequence): one host copy after the last pass.

Each draft row gets the processing target sampling applies (logit_bias,
allowed_token_ids, min_tokens at the row's output count, temperature, top-k/top-p/
min-p). Greedy requests take the argmax; sampled requests draw from the processed
distribution q and the proposal carries q, which verification needs to stay exact
(`SpecRows.draft_probs`). A seeded request's draws come from a generator derived from
its seed and the draft's position, so its drafts depend on its tokens alone, never on
the batch. Catch-up tokens of a step are bounded by the engine's token budget; a
request that does not fit catches up in chunks over the next steps and drafts when
done. When the draft's pool is full, sequences not drafting this step are dropped, least
recently used first (their full blocks stay in the draft's prefix cache); a request
that still does not fit gets no proposal.

The passes and draws (draft_passes.py) and the pool with its sequences (proposer_kv.py)
are shared with the EAGLE head (eagle.py); what is the draft model's own is here: its
loading, and reconciling a sequence with the target's tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from rtpllm.attention import AttentionBackend, get_backend
from rtpllm.config import EngineConfig, parse_dtype
from rtpllm.engine.model_runner import ModelRunner, PrevTokens
from rtpllm.engine.request import Request
from rtpllm.engine.scheduler import SchedulerOutput
from rtpllm.kvcache.block_manager import BlockManager, PrefixHit
from rtpllm.kvcache.kv_format import KVCacheSpec
from rtpllm.kvcache.kv_pool import KVPool
from rtpllm.loader import load_checkpoint_fast
from rtpllm.models import DecoderLM, ModelConfig, build_model, fill_random
from rtpllm.models.registry import resolve_model
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative.adaptive import PassCost, StepCostModel
from rtpllm.speculative.draft_passes import DraftStats, Work, collect_works, position_seed, run_passes
from rtpllm.speculative.proposer import NO_PROPOSAL, Proposal, Proposer
from rtpllm.speculative.proposer_kv import DraftSeq, ProposerKV

__all__ = ["DraftModelProposer", "DraftStats", "position_seed"]

log = logging.getLogger(__name__)

# The draft's block keys live in its own pool only; they never leave the process.
_NAMESPACE = b"rtpllm-draft-model"
# Draft sequences are run by the draft's runner, never sampled by the engine's sampler.
_SEQ_PARAMS = SamplingParams(max_tokens=None)


class DraftModelProposer(Proposer):
    """Proposes with a draft model; see the module docstring. Built in two stages, as
    the engine's memory plan needs: `load` (weights), then `allocate_kv` (its pool,
    sized from the KV budget the engine splits with it)."""

    name = "draft"

    def __init__(
        self,
        model: DecoderLM,
        model_config: ModelConfig,
        backend: AttentionBackend,
        config: EngineConfig,
        max_len: int,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.backend = backend
        self.device = config.device
        self.dtype = parse_dtype(config.dtype, config.device)
        self.max_len = max_len
        # Catch-up (prompt) tokens per step, as for the target's own prefill chunks.
        self.max_pass_tokens = config.scheduler.max_num_batched_tokens
        # The draft's KV in the target's KV format, when that is one format for all
        # layers; a per-layer plan is the target's, so the draft keeps its dtype then.
        kv_spec = KVCacheSpec.resolve(model_config.num_layers, self.dtype, config.cache.kv_cache_dtype)
        self.kv = ProposerKV(
            model_config,
            config.cache.block_size,
            self.dtype,
            self.device,
            kv_spec,
            _NAMESPACE,
            config.cache.enable_prefix_caching,
            "draft model",
        )
        self._generator = torch.Generator(device=torch.device(self.device))
        self._generator.manual_seed(config.seed + 2)  # unseeded sampled requests' draws
        self._cost = StepCostModel()
        self.stats = DraftStats()

    @classmethod
    def load(cls, config: EngineConfig, target: ModelConfig, max_len: int) -> DraftModelProposer:
        """Check the draft model against the target (ValueError naming both for a
        vocabulary mismatch) and load its weights."""
        spec = config.speculative
        assert spec.draft_model is not None
        try:
            model_dir = resolve_model(spec.draft_model)
        except ValueError as exc:
            raise ValueError(f"speculative draft model: {exc}") from None
        draft = ModelConfig.from_dir(model_dir)
        if draft.vocab_size != target.vocab_size:
            raise ValueError(
                f"the draft model {spec.draft_model!r} has a vocabulary of {draft.vocab_size} tokens and the "
                f"target {config.model!r} one of {target.vocab_size}; a draft model must share the target's tokenizer"
            )
        if draft.vision is not None:
            raise ValueError(f"the draft model {spec.draft_model!r} is a vision-language model; use a text-only one")
        dtype = parse_dtype(config.dtype, config.device)
        backend = get_backend(config.attention_backend, config.device)
        # The whole draft runs on this process's device, even beside a tensor-parallel target.
        model = build_model(draft, backend, max_len, dtype, config.device, None)
        if config.load_format == "dummy":
            fill_random(model, config.seed)
        else:
            stats = load_checkpoint_fast(
                model_dir,
                model.checkpoint_targets(),
                optional=model.optional_checkpoint_names(),
                ignore=model.ignores_checkpoint_tensor,
            )
            log.info("draft model: loaded %d tensors (%.2f GB) in %.2f s", stats.num_tensors, stats.bytes_read / 1e9, stats.seconds)
        return cls(model, draft, backend, config, max_len)

    # -- memory ----------------------------------------------------------------------

    @property
    def bytes_per_block(self) -> int:
        return self.kv.bytes_per_block

    @property
    def pool(self) -> KVPool | None:
        return self.kv.pool

    @property
    def blocks(self) -> BlockManager | None:
        return self.kv.blocks

    @property
    def runner(self) -> ModelRunner | None:
        return self.kv.runner

    def allocate_kv(self, num_blocks: int) -> None:
        self.kv.allocate(num_blocks, lambda pool, blocks: ModelRunner(self.model, pool, blocks, self.backend, self.device))

    def enable_cuda_graphs(self, max_batch: int) -> None:
        """Capture the draft's decode passes (CUDA only; after the target's pool exists)."""
        assert self.kv.runner is not None
        self.kv.runner.enable_cuda_graphs(max_batch, self.max_len)

    def reset(self) -> None:
        """Forget every sequence, the prefix cache and the measured pass times (after
        the engine's warm-up, whose passes timed compilation)."""
        self.kv.reset()
        self._cost = StepCostModel()
        self.stats = DraftStats()

    # -- the Proposer interface ------------------------------------------------------

    def recover(self) -> None:
        """After a failed proposal: every draft sequence is dropped (their KV may be
        half-written); requests catch up again, from the draft's prefix cache."""
        self.kv.drop_all()

    @property
    def pass_cost(self) -> StepCostModel:
        """Measured seconds of one draft pass by the tokens in it."""
        return self._cost

    def cost(self, requests: Sequence[Request]) -> PassCost:
        """Pass 1 of a request carries the tokens its sequence must catch up on (one
        after a rejection, two after all drafts were accepted, more after steps without
        drafts); a request the draft has not seen counts one: its prompt's prefill is
        a one-time cost, as the target's own prefill is, not a cost of its drafts."""
        first: list[int] = []
        for req in requests:
            seq = self.kv.seqs.get(req.request_id)
            kept = self._kept(seq, req.all_token_ids) if seq is not None else None
            first.append(req.num_tokens - kept if kept is not None else 1)
        return PassCost(self._cost, first)

    def propose(self, request_id: str, tokens: Sequence[int], k: int, private: bool = False) -> Proposal:
        """A greedy proposal for a bare token sequence (the engine calls `propose_batch`)."""
        req = Request(request_id=request_id, prompt_token_ids=list(tokens), params=SamplingParams(temperature=0))
        return self.propose_batch([(req, k)])[0]

    def forget(self, request_id: str, output_tokens: Sequence[int] | None = None) -> None:
        self.kv.drop(request_id)

    @torch.inference_mode()
    def propose_batch(self, batch: Sequence[tuple[Request, int]]) -> list[Proposal]:
        assert self.kv.blocks is not None, "allocate_kv first"
        self.kv.tick += 1
        works = collect_works(batch, self.max_len, self.max_pass_tokens, self._prepare)
        proposals = [NO_PROPOSAL] * len(batch)
        if works:
            done = run_passes(works, self._forward, self._generator, self._cost, self.stats, self.device.startswith("cuda"))
            for work, proposal in zip(works, done, strict=True):
                proposals[work.index] = proposal
        self.kv.blocks.take_events()  # the draft's prefix cache is private: no KV events leave it
        return proposals

    def _forward(self, step: SchedulerOutput, prev: PrevTokens | None, live: list[Work], depth: int) -> torch.Tensor:
        """One draft pass (run_passes): the draft model's logits of the live works' rows."""
        assert self.kv.runner is not None and self.kv.blocks is not None
        out = self.kv.runner.execute(step, prev)
        if depth == 1:  # catch-up tokens are the target's: cache their full blocks
            for item in step.scheduled:
                self.kv.blocks.commit(item.request, item.start + item.num_new_tokens)
        rows = {item.request.request_id: r for r, item in enumerate(out.sample_items)}
        index = [rows[w.seq.req.request_id] for w in live]
        return out.logits[torch.tensor(index, dtype=torch.long, device=out.logits.device)]

    # -- sequences -------------------------------------------------------------------

    def _prepare(self, index: int, req: Request, k: int, budget: int, protect: set[str]) -> Work | None:
        """Bring the request's draft sequence up to date and give it the blocks this
        call writes; None if the pool has no room for it."""
        blocks = self.kv.blocks
        assert blocks is not None
        seq = self.kv.seqs.get(req.request_id)
        if seq is not None and not self._reconcile(seq, req.all_token_ids):
            self.kv.drop(req.request_id)
            seq = None
        hit: PrefixHit | None = None
        if seq is None:
            inner = Request(request_id=req.request_id, prompt_token_ids=list(req.all_token_ids), params=_SEQ_PARAMS)
            hit = blocks.find_prefix(inner)
            inner.num_computed_tokens = hit.num_tokens
            seq = DraftSeq(inner, req.num_tokens)
        computed = seq.req.num_computed_tokens
        feed = min(req.num_tokens - computed, budget)
        done = computed + feed == req.num_tokens
        # Positions written: the catch-up tokens, then drafts 1..k-1 (draft k is not fed).
        need = computed + feed + (k - 1 if done else 0)
        if hit is None:
            blocks.truncate(req.request_id, need)  # blocks of rejected drafts past it
        fitted, dropped = self.kv.allocate_seq(seq.req, need, hit, protect)
        self.stats.dropped += dropped
        if not fitted:
            if hit is not None:
                blocks.free(req.request_id)  # the empty table find_prefix made
            return None
        self.kv.seqs[req.request_id] = seq
        seq.last_used = self.kv.tick
        return Work(index, req, seq, k if done else 0, feed)

    @staticmethod
    def _kept(seq: DraftSeq, tokens: Sequence[int]) -> int | None:
        """How many of the target's `tokens` the sequence's KV still holds: up to the
        first position where the sequence differs (the target's tokens only grow, so
        the ones synced before are still there), and never the last token, whose
        logits give draft 1 (it runs again even when its KV is there: the target decoded
        it plainly and it was this sequence's draft). None if the sequence is not of
        these tokens (a different request)."""
        inner = seq.req.all_token_ids
        n = seq.synced
        if len(tokens) < n or inner[n - 1] != tokens[n - 1]:
            return None
        limit = min(len(inner), len(tokens))
        while n < limit and inner[n] == tokens[n]:
            n += 1
        return min(seq.req.num_computed_tokens, n, len(tokens) - 1)

    def _reconcile(self, seq: DraftSeq, tokens: Sequence[int]) -> bool:
        """Make the sequence the target's tokens again, keeping the KV `_kept` says.
        False if it is not of these tokens."""
        assert self.kv.blocks is not None
        kept = self._kept(seq, tokens)
        if kept is None:
            return False
        inner = seq.req.all_token_ids
        seq.req.num_computed_tokens = kept
        del inner[kept:]
        inner.extend(tokens[kept:])
        seq.synced = len(tokens)
        # Full blocks of the target's own tokens may serve other sequences' prompts.
        self.kv.blocks.commit(seq.req, seq.req.num_computed_tokens)
        return True
