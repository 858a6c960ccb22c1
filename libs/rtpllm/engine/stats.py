"""Engine statistics as plain data (torch-free: heartbeats and metrics read them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_free_blocks: int = 0
    num_blocks: int = 0
    prefix_hit_ratio: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    num_awaiting_kv: int = 0  # decode side: requests waiting for a remote prefill's KV
    num_held_kv: int = 0  # prefill side: finished prefills whose KV is still being shipped
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    tier_hit_tokens: dict[str, int] = field(default_factory=dict)  # tier -> prompt tokens not recomputed
    kvstore_host: str = ""  # the host whose kvstore service holds this engine's KV tiers, if any
    # Speculative decoding (docs/speculative_decoding.md); zero/empty when off.
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_acceptance_lengths: dict[int, int] = field(default_factory=dict)  # accepted drafts -> verifications
    spec_chosen_k: dict[int, int] = field(default_factory=dict)  # draft length chosen -> request-steps
