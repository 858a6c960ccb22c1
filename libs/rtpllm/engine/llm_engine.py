"""The synchronous engine: request -> scheduler -> model runner -> sampler -> outputs.

One `step()` runs one batched forward pass. The offline `LLM` drives it in a loop; the
asyncio engine drives it from a thread. Nothing here knows about services or I/O.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from rtpllm.attention import get_backend
from rtpllm.config import EngineConfig, dtype_name, parse_dtype
from rtpllm.engine.cuda_graphs import plain_graph_rows, verify_graph_rows, verify_span
from rtpllm.engine.kv_offload import KVOffload
from rtpllm.engine.model_runner import ModelRunner, PrevTokens
from rtpllm.engine.multimodal import MultimodalRunner
from rtpllm.engine.output_processor import Finish, LogprobRow, OutputProcessor
from rtpllm.engine.piecewise_graphs import mixed_graph_tokens
from rtpllm.engine.request import Request
from rtpllm.engine.sampler import PendingSample, Sampler, needs_history, prompt_logprobs
from rtpllm.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from rtpllm.engine.sharded_blocks import ShardedPoolBlocks
from rtpllm.engine.stats import EngineStats
from rtpllm.engine.step_clock import StepClock
from rtpllm.engine.structured import MaskJob, StructuredOutputs
from rtpllm.engine.tensor_parallel import TensorParallel, TensorParallelError, closes_on_failure
from rtpllm.engine.validation import validate_prompt
from rtpllm.kvcache.block_hash import namespace_key
from rtpllm.kvcache.block_manager import BlockManager, PrefixHit
from rtpllm.kvcache.events import CachedKeys, KVEventBatch
from rtpllm.kvcache.kv_plan import cache_spec, load_plan
from rtpllm.kvcache.kv_pool import KVPool, bytes_per_block
from rtpllm.loader import load_checkpoint_fast
from rtpllm.loader.checkpoint_digest import weights_identity
from rtpllm.models import DecoderLM, ModelConfig, build_model, fill_random
from rtpllm.models.k_centering import apply_key_transforms
from rtpllm.models.registry import cache_root, resolve_model, served_model_name
from rtpllm.outputs import CompletionOutput, KVHandoff, KVReservation, PositionLogprobs, RequestOutput
from rtpllm.parallel.layout import ShardLayout
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative.adaptive import PolicyConfig
from rtpllm.speculative.draft import DraftModelProposer
from rtpllm.speculative.eagle import EagleProposer
from rtpllm.speculative.proposer import build_proposer
from rtpllm.speculative.speculator import Speculator
from rtpllm.speculative.verify import SpecRows, Verified, verify
from rtpllm.tokenizer import Tokenizer
from rtpllm.transfer.blocks import KVBlocks, pool_blocks
from rtpllm.transfer.layout import KVLayout

if TYPE_CHECKING:
    import numpy as np

    from rtpllm.multimodal.families import VisionFamily
    from rtpllm.multimodal.inputs import MultimodalInputs

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A launched step whose sampled tokens have not been read back yet."""

    step: SchedulerOutput
    requests: list[Request]  # the sampling rows, in order
    sample: PendingSample | None
    prompt_logits: list[tuple[ScheduledRequest, int, torch.Tensor]]
    # Recorded after the forward pass when a prefill-only request ran: its KV may be
    # read by another thread once this has completed (CUDA only).
    kv_written: torch.cuda.Event | None = None
    # Times the step for the KV tiers' cost model (prompt tokens per second); only
    # when there are tiers and the step ran prompt tokens.
    clock: StepClock | None = None
    # Speculative decoding: each drafted request's verified tokens (read back already:
    # a step with drafts is synchronous).
    verified: list[tuple[ScheduledRequest, Verified]] | None = None

    def prev_tokens(self) -> PrevTokens | None:
        if self.sample is None:
            return None
        return PrevTokens(self.sample.tokens, {r.request_id: i for i, r in enumerate(self.requests)})


@dataclass
class _Group:
    """A user request: n samples sharing one id and prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    sent_prompt_logprobs: int = 0
    error: str | None = None
    stream: bool = True  # outputs after every step (delta), or only at the end (final)

    @property
    def finished(self) -> bool:
        for child in self.children:
            if not child.is_finished:
                return False
        return True


class LLMEngine:
    """Owns the model, KV pool, block manager, scheduler, runner and sampler of one engine."""

    @closes_on_failure
    def __init__(
        self,
        config: EngineConfig,
        on_kv_events: Callable[[KVEventBatch], None] | None = None,
        engine_id: str = "engine-0",
        load_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.config = config
        self._load_progress = load_progress
        self.engine_id = engine_id
        self.device = config.device
        if torch.device(self.device).index is not None:
            # Triton launches on the thread's current device, whatever the tensors' device.
            torch.cuda.set_device(torch.device(self.device))
        self.dtype = parse_dtype(config.dtype, config.device)
        self.model_dir = resolve_model(config.model)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.served_model_name = served_model_name(config.model, config.served_model_name)
        self.tokenizer = self._load_tokenizer()
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            eos.update(self.tokenizer.eos_token_ids)
        self.eos_token_ids = tuple(sorted(eos))

        max_len = config.max_model_len or self.model_config.max_position_embeddings
        self.backend = get_backend(config.attention_backend, self.device)
        t0 = time.perf_counter()
        # Tensor parallelism: the other ranks start now and load their shards meanwhile.
        self.tp: TensorParallel | None = None
        if config.tensor_parallel_size > 1:
            self.tp = TensorParallel.start(config, self.model_config, self.model_dir, self.device)
        self.model = self._load_model(max_len)
        # Vision-language models: the family (image token, processor) and the runner's
        # image encoding (the vision tower, in process).
        self.vision: VisionFamily | None = None
        multimodal = self._load_vision() if self.model_config.vision is not None else None
        self.load_seconds = time.perf_counter() - t0

        # Per-layer KV formats (docs/kv_quantization.md); the pool is sized in their bytes.
        plan = load_plan(config.cache)
        self.kv_spec = cache_spec(config.cache, self.model_config.num_layers, self.dtype, plan)
        if plan is not None:
            # The plan's K smoothing goes into the q/k weights and its K centering into
            # the RoPE kernel (both exact; docs/kv_quantization.md).
            smoothed, centered = apply_key_transforms(self.model, plan)
            if smoothed or centered:
                log.info("KV plan: K smoothing folded into layers %s, K centering on layers %s", smoothed, centered)
        # A draft model or EAGLE head (speculative decoding) loads now: its weights (and
        # an EAGLE head's feature store) count as used memory and its own KV pool takes a
        # share of the budget `_num_blocks` splits.
        self._draft: DraftModelProposer | EagleProposer | None = None
        if config.speculative.method == "draft":
            self._draft = DraftModelProposer.load(config, self.model_config, max_len)
        elif config.speculative.method == "eagle":
            self._draft = EagleProposer.load(config, self.model_config, self.model, max_len)
            self.model.set_feature_layers(self._draft.feature_layers)
        num_blocks = self._num_blocks()
        if self.tp is not None:
            num_blocks = self.tp.agree_num_blocks(num_blocks)
        block_size = config.cache.block_size
        if num_blocks * block_size < max_len:
            if config.max_model_len:
                raise ValueError(
                    f"KV pool holds {num_blocks * block_size} tokens, less than max_model_len={max_len}; "
                    "lower max_model_len or give the cache more memory"
                )
            log.warning("capping max_model_len to the KV pool's %d tokens", num_blocks * block_size)
            max_len = num_blocks * block_size
        self.max_model_len = max_len
        tp_size = config.tensor_parallel_size
        self.kv_pool = KVPool(self.model_config, num_blocks, block_size, self.dtype, self.device, tp_size, self.kv_spec)
        # Named by the weights' content, not their path: new weights at an old path must
        # never be served the old weights' KV from the SSD and Redis tiers.
        weights = weights_identity(
            self.model_dir, cache_root() / "digests", random_seed=config.seed if config.load_format == "dummy" else None, device=self.device
        )
        self.weights_identity = weights  # also names this model's image embeddings (vision service)
        # The KV format is part of every block key: blocks of two formats never meet.
        kv_format = self.kv_spec.namespace_format(self.dtype)
        namespace = namespace_key(weights, dtype_name(self.dtype), block_size, kv_format, tp_size=tp_size)
        self.block_manager = BlockManager(num_blocks, block_size, namespace, config.cache.enable_prefix_caching)
        self._kv_blocks: KVBlocks | None = None  # the pool as whole blocks (kv_blocks)
        self.offload = (
            KVOffload.create(config.offload, self._tier_pool(), self.block_manager) if config.offload.enabled else None
        )
        self.speculator = _build_speculator(config, self._draft) if config.speculative.enabled else None
        self._spec_generator: torch.Generator | None = None
        if self.speculator is not None:
            # Verification draws for unseeded requests (seeded ones use their own).
            self._spec_generator = torch.Generator(device=torch.device(self.device))
            self._spec_generator.manual_seed(config.seed + 1)
        self.scheduler = Scheduler(
            config.scheduler,
            self.block_manager,
            self._extend_prefix if self.offload else None,
            self.speculator.plan if self.speculator is not None else None,
        )
        self.runner = ModelRunner(self.model, self.kv_pool, self.block_manager, self.backend, self.device, multimodal, self.tp)
        self.runner.native_logits = True  # the sampler and the verifier cast what they need
        if isinstance(self._draft, EagleProposer):
            self.runner.enable_features()  # the head reads the target's hidden states
        if self.tp is not None:
            self.tp.send_shape(num_blocks, max_len)  # the other ranks build their pools, graphs
        if config.cuda_graphs:
            self.runner.enable_cuda_graphs(
                plain_graph_rows(config), max_len, verify_graph_rows(config), verify_span(config), mixed_graph_tokens(config)
            )
            if self._draft is not None:
                self._draft.enable_cuda_graphs(plain_graph_rows(config))
        self.sampler = Sampler(self.device, config.seed)
        self.structured = StructuredOutputs(self.tokenizer, self.eos_token_ids, self.model_config.vocab_size, self.device)
        self.outputs = OutputProcessor(self.tokenizer)
        self._on_kv_events = on_kv_events
        self._event_seq = itertools.count()
        self.last_event_seq = -1  # seq of the last KV event batch handed to on_kv_events
        self._groups: dict[str, _Group] = {}
        self._requests: dict[str, Request] = {}
        self._pending: dict[str, RequestOutput] = {}
        # Disaggregation: decode-side requests whose blocks await a remote prefill's KV,
        # groups changed outside a step (a remote prefill completed), and prefill-side
        # handoffs (held KV) not yet reported.
        self._awaiting: dict[str, Request] = {}
        self._touched_ext: dict[str, _Group] = {}
        self._handoffs: dict[str, KVHandoff] = {}
        self._in_flight: _InFlight | None = None
        self.async_scheduling = config.async_scheduling if config.async_scheduling is not None else self.device.startswith("cuda")
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.preemptions_total = 0
        if self.device.startswith("cuda"):
            self._warm_up()

    # -- construction ----------------------------------------------------------------

    def _load_tokenizer(self) -> Tokenizer | None:
        if not (self.model_dir / "tokenizer.json").is_file():
            log.warning("%s has no tokenizer.json: token-id prompts only, no text output", self.model_dir)
            return None
        return Tokenizer.from_dir(self.model_dir)

    def _load_model(self, max_len: int) -> DecoderLM:
        model = build_model(self.model_config, self.backend, max_len, self.dtype, self.device, self.tp.group if self.tp else None)
        if self.config.load_format == "dummy":
            fill_random(model, self.config.seed)
            return model
        stats = load_checkpoint_fast(
            self.model_dir,
            model.checkpoint_targets(),
            optional=model.optional_checkpoint_names(),
            ignore=model.ignores_checkpoint_tensor,
            progress=self._load_progress,
        )
        log.info("loaded %d tensors (%.2f GB) in %.2f s (%.2f GB/s)", stats.num_tensors, stats.bytes_read / 1e9, stats.seconds, stats.gb_per_s)
        return model

    def _load_vision(self) -> MultimodalRunner:
        # Imported here: text-only engines never load PIL, processors or towers.
        from rtpllm.multimodal.families import load_vision_family

        family = load_vision_family(self.model_dir, self.model_config)
        assert family is not None
        seed = self.config.seed if self.config.load_format == "dummy" else None
        tower = family.build_tower(self.model_dir, self.dtype, self.device, seed)
        self.vision = family
        return MultimodalRunner(family, tower, self.device, self.dtype)

    def _num_blocks(self) -> int:
        """The KV pool's blocks; with a draft model, also allocates the draft's pool from
        its share of the same budget."""
        cache = self.config.cache
        if cache.num_blocks is not None:
            if self._draft is not None:
                self._draft.allocate_kv(cache.num_blocks)  # as many tokens as the target's pool
            return cache.num_blocks
        per_block = bytes_per_block(
            self.model_config, cache.block_size, self.dtype, self.config.tensor_parallel_size, self.kv_spec
        )
        cuda = self.device.startswith("cuda")
        if cuda:
            free, total = torch.cuda.mem_get_info(torch.device(self.device))
            used = total - free
            budget = int(total * cache.gpu_memory_utilization) - used - _activation_reserve(self.config, self.model_config)
            if budget < per_block:
                raise RuntimeError("no GPU memory left for the KV cache; raise gpu_memory_utilization")
        else:
            budget = cache.cpu_kv_bytes
        if self._draft is not None:
            budget -= self._allocate_draft_kv(budget, per_block, scratch=1 if cuda else 0)
        if cuda:
            return budget // per_block - 1  # the pool adds one scratch block
        return max(1, budget // per_block)

    def _allocate_draft_kv(self, budget: int, per_block: int, scratch: int) -> int:
        """Give the draft model's pool its share of the KV budget (by default the share
        that holds as many tokens as the target's pool: every running sequence needs
        both); return the bytes it took."""
        assert self._draft is not None
        draft_block = self._draft.bytes_per_block
        share = self.config.speculative.draft_kv_share
        if share is None:
            share = draft_block / (draft_block + per_block)
        taken = int(budget * share)
        self._draft.allocate_kv(taken // draft_block - scratch)
        return taken

    def _warm_up(self) -> None:
        """Run a few real steps on throwaway requests so Triton compiles the kernel
        variants serving will use (prefill chunks over and under 64 tokens, a prefill
        mixed with decodes, a long uncached prompt, a chunk over its cached prefix) now,
        not inside the first requests.
        Leaves no trace: blocks freed, prefix cache emptied, counters and events reset."""
        on_events, self._on_kv_events = self._on_kv_events, None
        offload, self.offload = self.offload, None  # warm-up blocks stay out of the tiers
        self.block_manager.track_blocks = False
        vocab = self.model_config.vocab_size
        # A vision-language model refuses its image token in a prompt without images.
        image_token = self.vision.image_token_id if self.vision is not None else -1

        def token(x: int) -> int:
            return (x + (x % vocab == image_token)) % vocab

        budget = self.config.scheduler.max_num_batched_tokens
        lengths = [80, 8, min(1100, self.max_model_len - 8, budget)]
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, output_kind="final")
        for i, length in enumerate(lengths[:2]):
            self.add_request(f"__warmup{i}", [token(7 * j + i) for j in range(length)], params)
        for _ in range(3):
            self.step()
        long_prompt = [token(5 * j) for j in range(lengths[2])]
        self.add_request("__warmup2", long_prompt, params)  # joins decodes
        while self.has_unfinished_requests():
            self.step()
        # A chunk over a cached prefix (the long prompt's blocks): on a quantized cache a
        # chunk of >= 512 new tokens (QUANT_CHUNK_SDPA_MIN_TOKENS) takes SDPA with a
        # bottom-right causal mask, whose first call in a process is slow: the 0.6B fp8
        # offline run's first pass took ~3 s longer than later ones on an H100, and not
        # without that path. Paid here: that first pass went from 16,787 to 26,022 tok/s
        # (H100, docs/benchmarks.md, session 14).
        block_size, chunk = self.config.cache.block_size, 640
        prefix = min(lengths[2], self.max_model_len - chunk - 8) // block_size * block_size
        if self.config.cache.enable_prefix_caching and prefix > 0 and chunk <= budget:
            self.add_request("__warmup3", long_prompt[:prefix] + [token(3 * j + 1) for j in range(chunk)], params)
            while self.has_unfinished_requests():
                self.step()
        self.block_manager.reset_prefix_cache()
        self.block_manager.take_events()
        self.offload = offload
        self.block_manager.track_blocks = offload is not None
        self.block_manager.stats = type(self.block_manager.stats)()
        self.prompt_tokens_total = self.generation_tokens_total = self.preemptions_total = 0
        if self.speculator is not None:
            # Fresh: warm-up steps timed Triton compiles, and their outputs are no text.
            # A draft model is kept (its weights and pool), its state reset.
            if self._draft is not None:
                self._draft.reset()
            self.speculator = _build_speculator(self.config, self._draft)
            self.scheduler.plan_drafts = self.speculator.plan
        self._on_kv_events = on_events

    # -- requests --------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        prefill_only: bool = False,
        remote_prefill_min_tokens: int | None = None,
        multimodal: MultimodalInputs | None = None,
    ) -> KVReservation | None:
        """Queue a request. Raises ValueError (with a message fit for an API client) for
        an empty or over-long prompt, unknown token ids or a duplicate id.

        `multimodal`: the prompt's images (vision-language models), whose placeholder
        runs must be exactly the prompt's image tokens (rtpllm.multimodal.prompt builds
        both).

        Disaggregation (n == 1 only):
        - `prefill_only`: prefill side. The request stops after its first token with
          finish_reason "handoff" and its KV blocks stay held (outputs carry `kv`) until
          `release_kv`. Outputs come after every prefill chunk, so KV can be shipped
          while the rest of the prompt computes.
        - `remote_prefill_min_tokens`: decode side. If at least that many prompt tokens
          are not in the prefix cache and the blocks are free, the blocks are reserved
          and returned, and the request waits for `complete_remote_prefill` (KV written)
          or `fail_remote_prefill` (prefill it here); otherwise it is queued as usual
          and None is returned.
        """
        params = params or SamplingParams()
        if (prefill_only or remote_prefill_min_tokens is not None) and params.n != 1:
            raise ValueError("disaggregated prefill serves n=1 requests only")
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text: str | None = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; send prompt token ids")
            text = prompt
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        self._validate(token_ids, params)
        mrope_positions, mrope_delta = self._check_images(token_ids, multimodal)
        children = [
            Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                prompt_token_ids=token_ids,
                params=params.for_child(i) if params.n > 1 else params,
                eos_token_ids=self.eos_token_ids,
                max_model_len=self.max_model_len,
                group_id=request_id,
                index=i,
            )
            for i in range(params.n)
        ]
        self.structured.add(children)  # ValueError if the constraint does not compile
        for child in children:
            if child.params.seed is not None:
                child.generator = self.sampler.request_generator(child.params.seed)
            if child is not children[0]:
                child.wait_for = children[0]
            child.prefill_only = prefill_only
            if multimodal is not None and self.runner.multimodal is not None:
                child.mm, child.mrope_positions, child.mrope_delta = multimodal, mrope_positions, mrope_delta
                self.runner.multimodal.add(child)
            self._requests[child.request_id] = child
            self.outputs.add(child)
        group = _Group(request_id, text, token_ids, children, stream=params.output_kind == "delta")
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        self._groups[request_id] = group
        if remote_prefill_min_tokens is not None:
            reservation = self._reserve(children[0], remote_prefill_min_tokens)
            if reservation is not None:
                return reservation
        for child in children:
            self.scheduler.add(child)
        if self.offload is not None and self.offload.prefetcher is not None and params.prompt_logprobs is None:
            # Ask the KV tiers now (in the background): the answer is there when the
            # scheduler admits the request. Later samples of n > 1 hit the first's blocks.
            hit = self.block_manager.find_prefix(children[0])
            self.offload.prefetch(children[0].request_id, self._tier_keys(children[0]), len(hit.block_ids))
        return None

    # -- disaggregation --------------------------------------------------------------

    def _reserve(self, req: Request, min_tokens: int) -> KVReservation | None:
        """Allocate the prompt's blocks for a remote prefill if enough of it is uncached."""
        bm = self.block_manager
        hit = bm.find_prefix(req)
        if req.params.prompt_logprobs is not None or req.num_prompt_tokens - hit.num_tokens < max(min_tokens, 1):
            return None
        if not bm.allocate(req, req.num_prompt_tokens, hit):
            return None
        if self.offload is not None:
            self.offload.demote_evicted()  # the transfer will overwrite those blocks
        req.num_computed_tokens = req.num_cached_tokens = hit.num_tokens
        self._awaiting[req.request_id] = req
        skip = len(hit.block_ids)
        return KVReservation(block_ids=bm.block_table(req.request_id)[skip:], skip_blocks=skip, num_cached_tokens=hit.num_tokens)

    def kv_blocks(self, purpose: str = "prefill/decode disaggregation (the KV data plane)") -> KVBlocks:
        """The KV pool as the PD data plane and the KV tiers move it (built on first use):
        whole blocks, every KV head of the model. One rank: the pool tensor, or its layer
        pages for a mixed per-layer KV plan (transfer/blocks.py). With tensor parallelism
        the other ranks' heads come and go through rank 0 over the KV group
        (engine/sharded_blocks.py), which needs one pool tensor: a clear error, naming
        `purpose`, for a mixed plan there."""
        if self._kv_blocks is not None:
            return self._kv_blocks
        if self.tp is None:
            self._kv_blocks = pool_blocks(self.kv_pool, self.block_manager.namespace)
            return self._kv_blocks
        kv = self.kv_pool.require_uniform(f"{purpose} with tensor parallelism")
        layout = KVLayout.of(kv, self.block_manager.namespace)
        size = self.tp.size
        shards = [ShardLayout.of(self.model_config, rank, size) for rank in range(size)]
        whole = replace(layout, num_kv_heads=self.model_config.num_kv_heads)
        quantized = self.model_config.head_dim if self.kv_spec.is_quantized(0) else None
        heads = [(s.kv_head_start, s.num_kv_heads) for s in shards]
        self._kv_blocks = ShardedPoolBlocks(kv, whole, heads, self.tp.kv, self.tp.guard, quantized)
        return self._kv_blocks

    def _tier_pool(self) -> torch.Tensor | KVBlocks:
        """What the KV tiers read and write: with one rank the pool tensor itself (direct
        copies, no view in between), or a mixed plan's layer pages (`kv_blocks()`); with
        tensor parallelism the whole-block view, so the tiers hold whole blocks (every KV
        head, through rank 0) whatever the split."""
        if self.tp is None and self.kv_pool.kv is not None:
            return self.kv_pool.kv
        return self.kv_blocks("the KV tiers")

    def _extend_prefix(self, req: Request, hit: PrefixHit) -> PrefixHit | None:
        """Scheduler hook: restore the blocks past the pool's prefix hit that a lower KV
        tier holds (when faster than recomputing), then look the prefix up again. None
        while the tiers' answer or restore is still on its way (background tiers): the
        request keeps waiting, other requests run."""
        if self.offload is None:
            return hit
        keys = self._tier_keys(req)
        restored = self.offload.prefix_for(req.request_id, keys, hit.block_ids, req.num_preemptions)
        if restored is None:
            return None
        return self.block_manager.find_prefix(req) if restored else hit

    def _tier_keys(self, req: Request) -> list[bytes]:
        """The request's block keys a prefix hit may cover (all but the last token)."""
        bm = self.block_manager
        return bm.table_keys(req.request_id)[: (req.num_tokens - 1) // bm.block_size]

    def close(self) -> None:
        """Flush and close the KV tiers (pending write-behind, bounded); stop the other
        tensor-parallel ranks."""
        if self.offload is not None:
            self.offload.close()
        if self.tp is not None:
            self.tp.close()

    def complete_remote_prefill(
        self, request_id: str, first_token: int, logprobs: LogprobRow | None = None, num_cached_tokens: int = 0
    ) -> bool:
        """The reserved blocks hold the prompt's KV and `first_token` was sampled by the
        prefill instance: the request joins the batch and decodes from there.
        `num_cached_tokens`: prompt tokens the prefill instance did not compute. False if
        the request is no longer waiting (aborted)."""
        req = self._awaiting.pop(request_id, None)
        if req is None:
            return False
        req.num_computed_tokens = req.num_prompt_tokens
        self.block_manager.commit(req, req.num_prompt_tokens)
        self._accept_first_token(req, first_token, logprobs)
        req.num_cached_tokens = num_cached_tokens
        return True

    def fail_remote_prefill(self, request_id: str, first_token: int | None = None, logprobs: LogprobRow | None = None) -> bool:
        """The remote prefill failed: prefill here, in the reserved blocks. If the first
        token is already known (it may have reached the client), it is kept, not resampled."""
        req = self._awaiting.pop(request_id, None)
        if req is None:
            return False
        if first_token is not None:
            self._accept_first_token(req, first_token, logprobs)
        else:
            self.scheduler.add_reserved(req)
        return True

    def _accept_first_token(self, req: Request, token_id: int, logprobs: LogprobRow | None) -> None:
        req.append_output(token_id)
        req.first_token_time = time.monotonic()
        self.generation_tokens_total += 1
        ends = req.grammar is not None and self.structured.advance(req, 0, token_id)
        finish = self.outputs.process_token(req, token_id, logprobs, ends)
        if finish is not None:
            self.scheduler.finish(req, finish.reason, finish.stop_reason)
        else:
            self.scheduler.add_reserved(req)
        self._touched_ext[req.group_id] = self._groups[req.group_id]

    def release_kv(self, request_id: str) -> bool:
        """Free the KV a finished prefill-only request held for its transfer."""
        return self.block_manager.release(request_id)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        validate_prompt(token_ids, self.model_config.vocab_size, self.max_model_len)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none")
        vocab = self.model_config.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ())):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise ValueError(f"{name} token id {bad} is outside the vocabulary [0, {vocab})")
        # max_tokens past the context window is capped to it (finish_reason "length").

    def _check_images(self, token_ids: list[int], mm: MultimodalInputs | None) -> tuple[np.ndarray | None, int]:
        """ValueError unless the images fit the prompt; then the prompt's M-RoPE
        positions and delta (None, 0 for plain positions)."""
        if self.vision is None:
            if mm is not None:
                raise ValueError(f"model {self.served_model_name!r} does not take images")
            return None, 0
        if mm is None:
            # A placeholder without an image would run as a bare token embedding.
            if self.vision.image_token_id in token_ids:
                raise ValueError("the prompt holds image placeholder tokens but no images")
            return None, 0
        mm.check(token_ids, self.vision.image_token_id, self.model_config.hidden_size)
        return self.vision.positions(len(token_ids), mm.images)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now, freeing its blocks; its final output says "abort"."""
        group = self._groups.get(request_id)
        if group is None:
            return False
        self._touched_ext.pop(request_id, None)
        for child in group.children:
            if not child.is_finished:
                self.scheduler.finish(child, "abort")
        self._pending[request_id] = self._group_output(group)
        self._forget(group)
        return True

    def has_unfinished_requests(self) -> bool:
        """True while a step has work: requests to schedule, outputs to hand out or a
        launched step to finish. Requests waiting for a remote prefill's KV are not
        work (nothing can run for them until it arrives)."""
        return self.scheduler.has_unfinished() or bool(self._pending) or self._in_flight is not None or bool(self._touched_ext)

    # -- the step --------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batched forward pass; return a delta output per request that changed.

        With async scheduling, step n+1 is scheduled and launched before step n's tokens
        are read back, so the device never waits for Python; outputs then trail the
        launches by one step. Requests whose sampling reads their previous tokens
        (penalties) make that step synchronous.
        """
        # Outputs of first tokens accepted from a remote prefill go out on their own,
        # before this step adds tokens: a stream's first delta holds exactly its first
        # token, as the prefill instance's copy of it does (the gateway keeps one).
        handed: list[RequestOutput] = []
        for group in self._touched_ext.values():
            handed.append(self._group_output(group))
            if group.finished:
                self._forget(group)
        self._touched_ext = {}
        touched: dict[str, _Group] = {}
        prev = self._in_flight
        # Speculative decoding plans drafts from every running token, so a step that
        # plans runs after the previous one is read back (docs/speculative_decoding.md).
        speculate = self.speculator is not None and (
            not self.async_scheduling or self.speculator.wants_step(self.scheduler.running)
        )
        if prev is not None and (not self.async_scheduling or self._needs_history() or speculate):
            self._finish(prev, touched)
            prev = self._in_flight = None
        # Timed from here: a step that must first drain the one in flight (the first
        # speculating step after asynchronous ones) is not charged that step's tail,
        # or the policy would price its size at about two steps.
        started = time.perf_counter()
        if self.offload is not None:
            self.offload.settle()  # blocks of abandoned tier restores, back to the pool
        step = self.scheduler.schedule(speculate=speculate)
        self.preemptions_total += len(step.preempted)
        if self.offload is not None:
            self.offload.demote_evicted()  # before this step's writes reuse the blocks
            if step.is_empty and prev is None:
                # Nothing runs: only requests waiting for the KV tiers. Nap until one
                # answers (a few ms at most: new requests may come) instead of spinning.
                self.offload.wait_for_tiers(0.002)
        launched = self._launch(step, prev) if not step.is_empty else None
        if prev is not None:
            self._finish(prev, touched)
        self._in_flight = launched
        if launched is not None and (not self.async_scheduling or launched.verified):
            self._finish(launched, touched)
            self._in_flight = None
        if self.speculator is not None and launched is not None:
            # The step's cost for the adaptive policy is this call's wall time: a step
            # finished here (verifying steps are synchronous) costs its host work
            # (planning, packing, verification) and its device time; for pipelined steps
            # the call's wall time is the pipeline's time per step. A step left in
            # flight with none before it (the pipeline restarting) cost this call only
            # its host work: not a step's time.
            finished = self._in_flight is None
            elapsed = time.perf_counter() - started if finished or prev is not None else None
            self.speculator.observe_step(step.num_tokens, elapsed, pipelined=not finished)
        if self.offload is not None:
            self.offload.offer_committed()
        self._flush_events()
        outputs = handed + list(self._pending.values())
        self._pending.clear()
        for group in touched.values():
            finished = group.finished
            if finished or group.stream:
                outputs.append(self._group_output(group))
            if finished:
                self._forget(group)
        return outputs

    def _needs_history(self) -> bool:
        return any(needs_history(r.params) for r in self.scheduler.running)

    def _launch(self, step: SchedulerOutput, prev: _InFlight | None) -> _InFlight | None:
        """Run the forward pass and sampling of a step on the device, without waiting."""
        prev_tokens = prev.prev_tokens() if prev is not None else None
        timed = self.offload is not None and _prefill_tokens(step) > 0
        clock = StepClock(self.device.startswith("cuda")) if timed else None
        masks = self._start_masks(step, prev)
        try:
            result = self.runner.execute(step, prev_tokens)
        except Exception as exc:  # a failed step must not hang its requests
            log.exception("engine step failed")
            self._fail_step(step, f"engine step failed: {exc}")
            if isinstance(exc, TensorParallelError):
                raise  # the ranks are out of step for good: the engine is dead
            return None
        self.scheduler.update(step)
        for item, first, logits in result.prompt_logits:
            item.request.prompt_logprobs_done = first + logits.shape[0]
        logits, requests = result.logits, [i.request for i in result.sample_items]
        verified = None
        if any(i.draft for i in result.sample_items):
            logits, requests, verified = self._verify(result.logits, result.sample_items)
        if result.features is not None and self.speculator is not None:
            # An EAGLE head's input: the rows' hidden states, of drafted rows the accepted.
            accepted = {item.request.request_id: v.num_accepted for item, v in verified or ()}
            self.speculator.observe_features(step, result.features, accepted)
        mask = masks.result() if masks is not None else None  # computed during the forward pass
        sample = self.sampler.sample(logits, requests, mask) if requests else None
        for req in requests:
            req.append_placeholder()
        if clock is not None:
            clock.stop()
        kv_written = None
        if self.device.startswith("cuda") and any(item.request.prefill_only for item in step.scheduled):
            kv_written = torch.cuda.Event()
            kv_written.record()
        return _InFlight(step, requests, sample, result.prompt_logits, kv_written, clock, verified)

    def _verify(
        self, logits: torch.Tensor, items: list[ScheduledRequest]
    ) -> tuple[torch.Tensor, list[Request], list[tuple[ScheduledRequest, Verified]]]:
        """Verify the drafted requests' rows now (speculative decoding); return the
        other rows' logits and requests, for the sampler."""
        plain: list[int] = []
        spec_rows: list[int] = []
        drafted: list[ScheduledRequest] = []
        row = 0
        for item in items:
            if item.draft:
                spec_rows.extend(range(row, row + len(item.draft) + 1))
                drafted.append(item)
            else:
                plain.append(row)
            row += len(item.draft) + 1
        assert self._spec_generator is not None
        index = torch.tensor(spec_rows, device=logits.device)
        assert self.speculator is not None
        rows = [SpecRows(i.request, i.draft, self.speculator.draft_probs(i.request.request_id, len(i.draft))) for i in drafted]
        results = verify(logits[index].float(), rows, self._spec_generator)
        rest = logits[torch.tensor(plain, dtype=torch.long, device=logits.device)]
        return rest, [i.request for i in items if not i.draft], list(zip(drafted, results, strict=True))

    def _start_masks(self, step: SchedulerOutput, prev: _InFlight | None) -> MaskJob | None:
        """Start the grammar masks of the step's constrained rows on the worker thread
        (None when the step has none); they are ready by the time the forward pass is."""
        if not self.structured.num_live:
            return None
        rows = [item.request for item in step.scheduled if item.samples and not item.draft]
        if prev is None or prev.sample is None:
            return self.structured.start(rows, None, {})
        # Async scheduling: tokens of the step in flight are read by the worker itself.
        flight_rows = {r.request_id: i for i, r in enumerate(prev.requests) if r.grammar is not None}
        return self.structured.start(rows, prev.sample.token_ids, flight_rows)

    def _finish(self, flight: _InFlight, touched: dict[str, _Group]) -> None:
        """Read a launched step's results back and turn them into outputs."""
        if flight.clock is not None:
            step = flight.step
            seconds = flight.clock.seconds()
            if self.offload is not None and _prefill_tokens(step) > 0:
                self.offload.observe_prefill(_prefill_tokens(step), seconds)
        self._record_prompt_logprobs(flight.prompt_logits, touched)
        if flight.kv_written is not None:
            flight.kv_written.synchronize()  # the KV reported below is readable from any stream
        for item in flight.step.scheduled:
            req = item.request
            if not req.is_finished:
                self.scheduler.commit(req)
                if req.prefill_only:
                    req.num_kv_ready = min(item.start + item.num_new_tokens, req.num_prompt_tokens)
                    touched[req.group_id] = self._groups[req.group_id]
        if flight.verified:
            self._accept_verified(flight.verified, touched)
        if flight.sample is None:
            return
        token_ids, logprob_rows = flight.sample.resolve()
        now = time.monotonic()
        for req, token_id, lp in zip(flight.requests, token_ids, logprob_rows, strict=True):
            if req.is_finished:  # finished or aborted while this step was in flight
                continue
            position = req.num_output_tokens - req.num_placeholders
            req.resolve_placeholder(token_id)
            # Structured outputs: a complete grammar ends the request (a prefill-only
            # request hands off instead; the decode side's matcher sees the token too).
            ends = req.grammar is not None and self.structured.advance(req, position, token_id) and not req.prefill_only
            self.generation_tokens_total += 1
            if req.first_token_time is None:
                req.first_token_time = now
                self.prompt_tokens_total += req.num_prompt_tokens
            finish = self.outputs.process_token(req, token_id, lp, ends)
            if finish is None and req.prefill_only:
                # Hand the KV over instead of decoding: it stays held past the finish.
                self._handoffs[req.request_id] = KVHandoff(self.block_manager.hold(req.request_id), req.num_prompt_tokens, lp)
                finish = Finish("handoff")
            if finish is not None:
                self.scheduler.finish(req, finish.reason, finish.stop_reason)
            touched[req.group_id] = self._groups[req.group_id]

    def _accept_verified(self, verified: list[tuple[ScheduledRequest, Verified]], touched: dict[str, _Group]) -> None:
        """Append each drafted request's accepted tokens and its correction or bonus
        token, one at a time through the stop checks (nothing past a stop or
        max_tokens); then roll the KV back to what was accepted."""
        assert self.speculator is not None
        self.speculator.counters.speculative_steps += 1
        for item, result in verified:
            req = item.request
            if req.is_finished:  # aborted meanwhile
                continue
            self.speculator.observe_verified(req, len(item.draft), result.num_accepted)
            finish: Finish | None = None
            for n, (token_id, lp) in enumerate(zip(result.tokens, result.logprobs, strict=True)):
                if n:
                    req.num_computed_tokens += 1  # the accepted draft before it has KV
                req.append_output(token_id)
                self.generation_tokens_total += 1
                finish = self.outputs.process_token(req, token_id, lp)
                if finish is not None:
                    break
            touched[req.group_id] = self._groups[req.group_id]
            if finish is not None:
                self.scheduler.finish(req, finish.reason, finish.stop_reason)
                continue
            # Blocks past the accepted tokens held only rejected drafts. The blocks kept
            # may hold rejected KV past num_computed_tokens; it is overwritten before any
            # block is full, and only full blocks of computed tokens are ever cached.
            self.block_manager.truncate(req.request_id, req.num_tokens)
            self.scheduler.commit(req)

    def _record_prompt_logprobs(self, spans: list, touched: dict[str, _Group]) -> None:
        for item, first, logits in spans:
            req = item.request
            group = self._groups.get(req.group_id)
            if group is None:
                continue
            k = req.params.prompt_logprobs or 0
            nxt = req.prompt_token_ids[first + 1 : first + 1 + logits.shape[0]]
            rows = prompt_logprobs(logits, nxt, k)
            if req.index == 0 and group.prompt_logprobs is not None:
                group.prompt_logprobs.extend(self.outputs.format_logprobs(t, row) for t, row in zip(nxt, rows, strict=True))
            touched[req.group_id] = group

    def _fail_step(self, step: SchedulerOutput, message: str) -> None:
        for item in step.scheduled:
            req = item.request
            group = self._groups.get(req.group_id)
            if group is None:
                continue
            group.error = message
            for child in group.children:
                if not child.is_finished:
                    self.scheduler.finish(child, "error")
            self._pending[group.request_id] = self._group_output(group)
            self._forget(group)

    def _group_output(self, group: _Group) -> RequestOutput:
        finished = group.finished
        outs: list[CompletionOutput] = []
        for child in group.children:
            outs.append(self.outputs.take_delta(child, child.is_finished))
        prompt_lp = None
        if group.prompt_logprobs is not None and len(group.prompt_logprobs) > group.sent_prompt_logprobs:
            prompt_lp = group.prompt_logprobs[group.sent_prompt_logprobs :]
            group.sent_prompt_logprobs = len(group.prompt_logprobs)
        lead = group.children[0]
        kv = None
        if lead.prefill_only:
            kv = self._handoffs.pop(lead.request_id, None)
            if kv is None and self.block_manager.has_table(lead.request_id):
                kv = KVHandoff(list(self.block_manager.block_table(lead.request_id)), lead.num_kv_ready)
        metrics = {"arrival_time": lead.arrival_time}
        if lead.first_token_time is not None:
            metrics["first_token_time"] = lead.first_token_time
        return RequestOutput(
            request_id=group.request_id,
            prompt_token_ids=group.prompt_token_ids,
            outputs=outs,
            finished=finished,
            prompt=group.prompt,
            num_cached_tokens=max(lead.num_cached_tokens, 0),
            prompt_logprobs=prompt_lp,
            error=group.error,
            metrics=metrics,
            kv=kv,
        )

    def _forget(self, group: _Group) -> None:
        self._groups.pop(group.request_id, None)
        self.structured.forget(group.children)
        multimodal = self.runner.multimodal
        for child in group.children:
            if self.speculator is not None:
                self.speculator.forget(child)
            if multimodal is not None:
                multimodal.drop(child.request_id)
            self._requests.pop(child.request_id, None)
            self._awaiting.pop(child.request_id, None)
            if self.offload is not None:
                self.offload.forget(child.request_id)
            self._handoffs.pop(child.request_id, None)
            self.outputs.remove(child.request_id)

    def _flush_events(self) -> None:
        events = self.block_manager.take_events()
        if self.offload is not None:
            events += self.offload.take_events()
        if events and self._on_kv_events is not None:
            self.last_event_seq = next(self._event_seq)
            self._on_kv_events(KVEventBatch(engine_id=self.engine_id, seq=self.last_event_seq, events=events))

    def cached_block_keys(self) -> CachedKeys:
        """Every block key in the prefix cache and in the host-memory tier, and the seq
        of the last KV event batch they reflect (a router rebuilds its view of this
        engine from them)."""
        self._flush_events()
        host = self.offload.host_keys() if self.offload is not None else []
        return CachedKeys(self.block_manager.cached_keys(), host, self.last_event_seq)

    # -- introspection ---------------------------------------------------------------

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_blocks=bm.num_blocks,
            prefix_hit_ratio=bm.stats.hit_ratio,
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
            num_preemptions=self.preemptions_total,
            num_awaiting_kv=len(self._awaiting),
            num_held_kv=bm.num_held,
            prefix_queried_tokens=bm.stats.queried_tokens,
            tier_hit_tokens=self._tier_hit_tokens(),
            kvstore_host=self.offload.kvstore_host if self.offload is not None else "",
            **self._spec_stats(),
        )

    def _spec_stats(self) -> dict:
        if self.speculator is None:
            return {}
        c = self.speculator.counters
        return {
            "spec_proposed_tokens": c.proposed_tokens,
            "spec_accepted_tokens": c.accepted_tokens,
            "spec_acceptance_lengths": dict(c.acceptance_lengths),
            "spec_chosen_k": dict(c.chosen_k),
        }

    def _tier_hit_tokens(self) -> dict[str, int]:
        """Prompt tokens served from each KV tier instead of recomputed ("gpu": the pool)."""
        bs = self.block_manager.block_size
        tiers = {t: n * bs for t, n in self.offload.tier_stats().items()} if self.offload is not None else {}
        return {"gpu": max(self.block_manager.stats.hit_tokens - sum(tiers.values()), 0), **tiers}


def _prefill_tokens(step: SchedulerOutput) -> int:
    """Prompt (and recompute) tokens of a step: not decodes, not verified drafts."""
    return step.num_tokens - step.num_decodes - sum(len(i.draft) + 1 for i in step.scheduled if i.draft)


def _build_speculator(config: EngineConfig, draft: DraftModelProposer | EagleProposer | None) -> Speculator:
    """The speculator of `config.speculative`; `draft`: the loaded draft model or EAGLE
    head (methods "draft", "eagle")."""
    spec = config.speculative
    assert spec.method is not None
    policy = PolicyConfig(max_k=spec.num_speculative_tokens, adaptive=spec.adaptive)
    if spec.method in ("draft", "eagle"):
        assert draft is not None
        return Speculator(draft, policy)
    options: dict[str, int | float] = {"min_n": spec.ngram_min, "max_n": spec.ngram_max} if spec.method == "ngram" else {}
    return Speculator(build_proposer(spec.method, **options), policy)


def _activation_reserve(config: EngineConfig, model: ModelConfig) -> int:
    """Bytes kept free for activations of the largest step (logits dominate); with a
    draft model or EAGLE head, also its proposal distributions (k rows of float32 per
    request); with an EAGLE head, the step's features (up to 3 hidden states a token)."""
    tokens = config.scheduler.max_num_batched_tokens
    seqs, vocab = config.scheduler.max_num_seqs, model.vocab_size
    reserve = tokens * (model.hidden_size * 16 + model.intermediate_size * 4) * 2 + seqs * vocab * 8
    if config.speculative.method in ("draft", "eagle"):
        reserve += seqs * config.speculative.num_speculative_tokens * vocab * 4 * 2
    if config.speculative.method == "eagle":
        reserve += tokens * model.hidden_size * 3 * 4
    return reserve
