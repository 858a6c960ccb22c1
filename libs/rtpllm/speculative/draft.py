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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rtpllm.attention import AttentionBackend, get_backend
from rtpllm.config import EngineConfig, parse_dtype
from rtpllm.engine.model_runner import ModelRunner, PrevTokens
from rtpllm.engine.request import PLACEHOLDER, Request
from rtpllm.engine.sampler import (
    _apply_token_bias,
    _filter,
    _mask_stops_before_min_tokens,
    has_token_bias,
    to_device,
)
from rtpllm.engine.scheduler import ScheduledRequest, SchedulerOutput
from rtpllm.engine.step_clock import StepClock
from rtpllm.kvcache.block_manager import BlockManager, PrefixHit
from rtpllm.kvcache.kv_format import KVCacheSpec
from rtpllm.kvcache.kv_pool import KVPool, bytes_per_block
from rtpllm.loader import load_checkpoint_fast
from rtpllm.models import DecoderLM, ModelConfig, build_model, fill_random
from rtpllm.models.registry import resolve_model
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative.adaptive import PassCost, StepCostModel
from rtpllm.speculative.proposer import NO_PROPOSAL, Proposal, Proposer
from rtpllm.speculative.verify import RowView

log = logging.getLogger(__name__)

# The draft's block keys live in its own pool only; they never leave the process.
_NAMESPACE = b"rtpllm-draft-model"
# Draft sequences are run by the draft's runner, never sampled by the engine's sampler.
_SEQ_PARAMS = SamplingParams(max_tokens=None)
_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """The seed of a seeded request's draft draw at `position` (splitmix64 of the pair):
    the same request at the same position draws the same noise, whatever the batch."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 0x632BE59BD9B4E019) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class _Seq:
    """The draft's copy of one target request. `req.all_token_ids` is the target's
    tokens as of the last proposal (`synced` of them), then the drafts fed since;
    `req.num_computed_tokens` counts the positions whose draft KV is in the pool."""

    req: Request
    synced: int
    last_used: int = 0


@dataclass
class _Work:
    """One request's part of a proposal call."""

    index: int  # in the batch
    target: Request
    seq: _Seq
    k: int  # drafts to make (0: only catching up this step)
    feed: int  # tokens pass 1 runs
    picks: list[tuple[int, int]] = field(default_factory=list)  # per draft: (pass, row in its tokens)
    probs: list[torch.Tensor] = field(default_factory=list)  # per draft, sampled requests only


@dataclass
class DraftStats:
    """Totals since start (benchmarks, logs)."""

    passes: int = 0
    pass_tokens: int = 0
    seconds: float = 0.0  # device time of the passes (wall time on CPU)
    dropped: int = 0  # sequences dropped for KV room


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
        self.block_size = config.cache.block_size
        self.prefix_caching = config.cache.enable_prefix_caching
        self.max_len = max_len
        # Catch-up (prompt) tokens per step, as for the target's own prefill chunks.
        self.max_pass_tokens = config.scheduler.max_num_batched_tokens
        # The draft's KV in the target's KV format, when that is one format for all
        # layers; a per-layer plan is the target's, so the draft keeps its dtype then.
        self.kv_spec = KVCacheSpec.resolve(model_config.num_layers, self.dtype, config.cache.kv_cache_dtype)
        self.pool: KVPool | None = None
        self.blocks: BlockManager | None = None
        self.runner: ModelRunner | None = None
        self._generator = torch.Generator(device=torch.device(self.device))
        self._generator.manual_seed(config.seed + 2)  # unseeded sampled requests' draws
        self._seqs: dict[str, _Seq] = {}
        self._tick = 0
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
        return bytes_per_block(self.model_config, self.block_size, self.dtype, 1, self.kv_spec)

    def allocate_kv(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("no KV memory left for the draft model's pool; give the cache more memory or the draft a larger share")
        self.pool = KVPool(self.model_config, num_blocks, self.block_size, self.dtype, self.device, 1, self.kv_spec)
        self.blocks = BlockManager(num_blocks, self.block_size, _NAMESPACE, self.prefix_caching)
        self.runner = ModelRunner(self.model, self.pool, self.blocks, self.backend, self.device)
        log.info("draft model KV pool: %d blocks of %d tokens", num_blocks, self.block_size)

    def enable_cuda_graphs(self, max_batch: int) -> None:
        """Capture the draft's decode passes (CUDA only; after the target's pool exists)."""
        assert self.runner is not None
        self.runner.enable_cuda_graphs(max_batch, self.max_len)

    def reset(self) -> None:
        """Forget every sequence, the prefix cache and the measured pass times (after
        the engine's warm-up, whose passes timed compilation)."""
        for rid in list(self._seqs):
            self._drop(rid)
        if self.blocks is not None:
            self.blocks.reset_prefix_cache()
            self.blocks.take_events()
            self.blocks.stats = type(self.blocks.stats)()
        self._cost = StepCostModel()
        self.stats = DraftStats()

    # -- the Proposer interface ------------------------------------------------------

    def recover(self) -> None:
        """After a failed proposal: every draft sequence is dropped (their KV may be
        half-written); requests catch up again, from the draft's prefix cache."""
        for rid in list(self._seqs):
            self._drop(rid)

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
            seq = self._seqs.get(req.request_id)
            kept = self._kept(seq, req.all_token_ids) if seq is not None else None
            first.append(req.num_tokens - kept if kept is not None else 1)
        return PassCost(self._cost, first)

    def propose(self, request_id: str, tokens: Sequence[int], k: int, private: bool = False) -> Proposal:
        """A greedy proposal for a bare token sequence (the engine calls `propose_batch`)."""
        req = Request(request_id=request_id, prompt_token_ids=list(tokens), params=SamplingParams(temperature=0))
        return self.propose_batch([(req, k)])[0]

    def forget(self, request_id: str, output_tokens: Sequence[int] | None = None) -> None:
        self._drop(request_id)

    @torch.inference_mode()
    def propose_batch(self, batch: Sequence[tuple[Request, int]]) -> list[Proposal]:
        assert self.blocks is not None, "allocate_kv first"
        self._tick += 1
        protect = {req.request_id for req, _ in batch}
        budget = self.max_pass_tokens
        works: list[_Work] = []
        for index, (req, k) in enumerate(batch):
            k = min(k, self.max_len - req.num_tokens + 1)
            if k > 0 and budget > 0:
                work = self._prepare(index, req, k, budget, protect)
                if work is not None:
                    works.append(work)
                    budget -= work.feed
        proposals = [NO_PROPOSAL] * len(batch)
        if works:
            for work, proposal in zip(works, self._run(works), strict=True):
                proposals[work.index] = proposal
        self.blocks.take_events()  # the draft's prefix cache is private: no KV events leave it
        return proposals

    # -- sequences -------------------------------------------------------------------

    def _prepare(self, index: int, req: Request, k: int, budget: int, protect: set[str]) -> _Work | None:
        """Bring the request's draft sequence up to date and give it the blocks this
        call writes; None if the pool has no room for it."""
        assert self.blocks is not None
        seq = self._seqs.get(req.request_id)
        if seq is not None and not self._reconcile(seq, req.all_token_ids):
            self._drop(req.request_id)
            seq = None
        hit: PrefixHit | None = None
        if seq is None:
            inner = Request(request_id=req.request_id, prompt_token_ids=list(req.all_token_ids), params=_SEQ_PARAMS)
            hit = self.blocks.find_prefix(inner)
            inner.num_computed_tokens = hit.num_tokens
            seq = _Seq(inner, req.num_tokens)
        computed = seq.req.num_computed_tokens
        feed = min(req.num_tokens - computed, budget)
        done = computed + feed == req.num_tokens
        # Positions written: the catch-up tokens, then drafts 1..k-1 (draft k is not fed).
        need = computed + feed + (k - 1 if done else 0)
        if hit is None:
            self.blocks.truncate(req.request_id, need)  # blocks of rejected drafts past it
        if not self._allocate(seq.req, need, hit, protect):
            if hit is not None:
                self.blocks.free(req.request_id)  # the empty table find_prefix made
            return None
        self._seqs[req.request_id] = seq
        seq.last_used = self._tick
        return _Work(index, req, seq, k if done else 0, feed)

    @staticmethod
    def _kept(seq: _Seq, tokens: Sequence[int]) -> int | None:
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

    def _reconcile(self, seq: _Seq, tokens: Sequence[int]) -> bool:
        """Make the sequence the target's tokens again, keeping the KV `_kept` says.
        False if it is not of these tokens."""
        assert self.blocks is not None
        kept = self._kept(seq, tokens)
        if kept is None:
            return False
        inner = seq.req.all_token_ids
        seq.req.num_computed_tokens = kept
        del inner[kept:]
        inner.extend(tokens[kept:])
        seq.synced = len(tokens)
        # Full blocks of the target's own tokens may serve other sequences' prompts.
        self.blocks.commit(seq.req, seq.req.num_computed_tokens)
        return True

    def _allocate(self, inner: Request, need: int, hit: PrefixHit | None, protect: set[str]) -> bool:
        assert self.blocks is not None
        while not self.blocks.allocate(inner, need, hit):
            idle = [s for rid, s in self._seqs.items() if rid not in protect]
            if not idle:
                return False
            victim = min(idle, key=lambda s: s.last_used)
            self._drop(victim.req.request_id)
            self.stats.dropped += 1
        return True

    def _drop(self, request_id: str) -> None:
        """Free a sequence's blocks; its full blocks of the target's tokens stay in the
        prefix cache (a later turn of the same chat, or this request again)."""
        seq = self._seqs.pop(request_id, None)
        if seq is not None and self.blocks is not None:
            self.blocks.commit(seq.req, min(seq.req.num_computed_tokens, seq.synced))
            self.blocks.free(request_id)

    # -- the passes ------------------------------------------------------------------

    def _run(self, works: list[_Work]) -> list[Proposal]:
        """Pass 1 (catch-up and draft 1), then one decode pass per further draft
        position; one host copy of every draft at the end."""
        assert self.runner is not None and self.blocks is not None
        cuda = self.device.startswith("cuda")
        drawn: list[torch.Tensor] = []  # per pass: the drafts it drew, one per row
        clocks: list[tuple[int, StepClock]] = []
        # Pass 1: 1-token rows first (the attention metadata's decodes), then extends.
        first = sorted(works, key=lambda w: w.feed != 1)
        items = [ScheduledRequest(w.seq.req, w.feed, w.seq.req.num_computed_tokens) for w in first]
        live = [w for w in first if w.k > 0]
        prev: PrevTokens | None = None
        depth = 1
        while True:
            clock = StepClock(cuda)
            step = SchedulerOutput(items, sum(1 for i in items if i.num_new_tokens == 1), [])
            out = self.runner.execute(step, prev)
            for item in items:
                item.request.num_computed_tokens = item.start + item.num_new_tokens
                if depth == 1:  # catch-up tokens are the target's: cache their full blocks
                    self.blocks.commit(item.request, item.request.num_computed_tokens)
            if not live:
                clock.stop()
                clocks.append((step.num_tokens, clock))
                break
            rows = {item.request.request_id: r for r, item in enumerate(out.sample_items)}
            logits = out.logits[to_device([rows[w.target.request_id] for w in live], torch.long, out.logits.device)]
            tokens, probs = self._draw(logits, live, depth)
            clock.stop()
            clocks.append((step.num_tokens, clock))
            for r, w in enumerate(live):
                w.picks.append((len(drawn), r))
                if probs[r] is not None:
                    w.probs.append(probs[r])
            drawn.append(tokens)
            live_rows = [(w, r) for r, w in enumerate(live) if w.k > depth]
            if not live_rows:
                break
            # The next pass feeds each draft from the device: a placeholder here.
            items = []
            for w, _ in live_rows:
                w.seq.req.all_token_ids.append(PLACEHOLDER)
                items.append(ScheduledRequest(w.seq.req, 1, w.seq.req.num_tokens - 1))
            prev = PrevTokens(tokens, {w.target.request_id: r for w, r in live_rows})
            live = [w for w, _ in live_rows]
            depth += 1
        host = torch.cat(drawn).tolist() if drawn else []
        offsets = [0]
        for t in drawn:
            offsets.append(offsets[-1] + t.shape[0])
        for tokens_in_pass, clock in clocks:
            seconds = clock.seconds()
            self._cost.observe(tokens_in_pass, seconds)
            self.stats.passes += 1
            self.stats.pass_tokens += tokens_in_pass
            self.stats.seconds += seconds
        proposals: list[Proposal] = []
        for w in works:
            draft = tuple(host[offsets[p] + r] for p, r in w.picks)
            inner = w.seq.req.all_token_ids
            fed = len(draft) - 1  # drafts 1..k-1 went in as placeholders
            if fed > 0:
                inner[len(inner) - fed :] = draft[:fed]
            if not draft:
                proposals.append(NO_PROPOSAL)
                continue
            probs = torch.stack(w.probs) if w.probs else None
            proposals.append(Proposal(draft, (1.0,) * len(draft), probs))
        return proposals

    def _draw(self, logits: torch.Tensor, works: list[_Work], depth: int) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Draft `depth` of each request from its row of draft logits (modified in
        place): the argmax for greedy requests, a draw from the processed distribution
        q (returned with it) for sampled ones."""
        views = [RowView(w.target.params, w.target.num_output_tokens + depth - 1, w.target.eos_token_ids) for w in works]
        if any(has_token_bias(v.params) for v in views):
            _apply_token_bias(logits, views)  # type: ignore[arg-type]
        if any(v.num_output_tokens < v.params.min_tokens for v in views):
            _mask_stops_before_min_tokens(logits, views)  # type: ignore[arg-type]
        tokens = logits.argmax(dim=-1)
        out: list[torch.Tensor | None] = [None] * len(works)
        sampled = [i for i, w in enumerate(works) if not w.target.params.greedy]
        if not sampled:
            return tokens, out
        device = logits.device
        index = to_device(sampled, torch.long, device)
        params = [views[i].params for i in sampled]
        temps = to_device([p.temperature for p in params], logits.dtype, device)
        probs = _filter(logits[index] / temps.unsqueeze(1), params).softmax(dim=-1)
        # The exponential race: argmax(q / e) with e ~ Exp(1) per entry draws from q.
        noise = torch.empty_like(probs)
        seeded = [(j, works[i]) for j, i in enumerate(sampled) if works[i].target.params.seed is not None]
        if len(seeded) < len(sampled):
            noise.exponential_(generator=self._generator)
        for j, w in seeded:
            seed = w.target.params.seed
            assert seed is not None
            g = torch.Generator(device=device).manual_seed(position_seed(seed, w.target.num_tokens + depth - 1))
            noise[j].exponential_(generator=g)
        tokens[index] = (probs / noise).argmax(dim=-1)
        for j, i in enumerate(sampled):
            out[i] = probs[j]
        return tokens, out
