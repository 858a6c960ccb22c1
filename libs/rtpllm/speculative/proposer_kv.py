"""The paged KV of a proposer that runs a model (a draft model, an EAGLE head): its pool,
its block manager and runner, and one persistent sequence per target request.

A sequence is an inner `Request` of the proposer's own tokens: its KV lives in the
proposer's pool between steps, and each proposer reconciles it with the target's
tokens in its own way (draft.py, eagle.py). When the pool is full, sequences of
requests not proposing in the current call are dropped, least recently used first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rtpllm.engine.model_runner import ModelRunner
from rtpllm.engine.request import Request
from rtpllm.kvcache.block_manager import BlockManager, PrefixHit
from rtpllm.kvcache.kv_format import KVCacheSpec
from rtpllm.kvcache.kv_pool import KVPool, bytes_per_block
from rtpllm.models import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class DraftSeq:
    """A proposer's copy of one target request. `req.all_token_ids` are the tokens its
    model ran (or runs next); `req.num_computed_tokens` counts the positions whose KV is
    in the pool. `synced`: what the owner has reconciled (the draft model: the target's
    token count at the last proposal; an EAGLE head: rows run on the target's own
    features). `offset`: the target position of the sequence's first position (EAGLE:
    the head's context may start after a prefix-cache hit)."""

    req: Request
    synced: int
    offset: int = 0
    last_used: int = 0


class ProposerKV:
    """A proposer model's KV pool, block manager, runner and sequences."""

    def __init__(
        self,
        model_config: ModelConfig,
        block_size: int,
        dtype: torch.dtype,
        device: str,
        kv_spec: KVCacheSpec,
        namespace: bytes,
        prefix_caching: bool,
        name: str,
    ) -> None:
        self.model_config = model_config
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self.kv_spec = kv_spec
        self.namespace = namespace
        self.prefix_caching = prefix_caching
        self.name = name  # for logs and errors: "draft model", "EAGLE head"
        self.pool: KVPool | None = None
        self.blocks: BlockManager | None = None
        self.runner: ModelRunner | None = None
        self.seqs: dict[str, DraftSeq] = {}
        self.tick = 0

    @property
    def bytes_per_block(self) -> int:
        return bytes_per_block(self.model_config, self.block_size, self.dtype, 1, self.kv_spec)

    def allocate(self, num_blocks: int, make_runner: Callable[[KVPool, BlockManager], ModelRunner]) -> None:
        """Allocate the pool and its block manager; `make_runner` builds the runner over them."""
        if num_blocks < 1:
            raise ValueError(f"no KV memory left for the {self.name}'s pool; give the cache more memory or the {self.name} a larger share")
        self.pool = KVPool(self.model_config, num_blocks, self.block_size, self.dtype, self.device, 1, self.kv_spec)
        self.blocks = BlockManager(num_blocks, self.block_size, self.namespace, self.prefix_caching)
        self.runner = make_runner(self.pool, self.blocks)
        log.info("%s KV pool: %d blocks of %d tokens", self.name, num_blocks, self.block_size)

    def reset(self) -> None:
        """Drop every sequence and the prefix cache (after the engine's warm-up)."""
        self.drop_all()
        if self.blocks is not None:
            self.blocks.reset_prefix_cache()
            self.blocks.take_events()
            self.blocks.stats = type(self.blocks.stats)()

    def allocate_seq(self, inner: Request, need: int, hit: PrefixHit | None, protect: set[str]) -> tuple[bool, int]:
        """Give `inner` blocks for `need` positions, dropping sequences of requests not in
        `protect` (least recently used first) until they fit. Returns (fitted, dropped)."""
        assert self.blocks is not None
        dropped = 0
        while not self.blocks.allocate(inner, need, hit):
            idle = [s for rid, s in self.seqs.items() if rid not in protect]
            if not idle:
                return False, dropped
            victim = min(idle, key=lambda s: s.last_used)
            self.drop(victim.req.request_id)
            dropped += 1
        return True, dropped

    def drop(self, request_id: str) -> None:
        """Free a sequence's blocks; its full blocks of synced tokens stay in the prefix
        cache (when the proposer keeps one): a later turn of the same chat, or this
        request again."""
        seq = self.seqs.pop(request_id, None)
        if seq is not None and self.blocks is not None:
            self.blocks.commit(seq.req, min(seq.req.num_computed_tokens, seq.synced))
            self.blocks.free(request_id)

    def drop_all(self) -> None:
        for rid in list(self.seqs):
            self.drop(rid)
