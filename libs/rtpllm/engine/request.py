"""A request's state as it moves through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rtpllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np

    from rtpllm.kvcache.block_hash import BlockExtras
    from rtpllm.multimodal.inputs import MultimodalInputs
    from rtpllm.structured.matcher import GrammarMatcher

# Stands for a sampled token whose value is still on the device (async scheduling).
PLACEHOLDER = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence to generate (a request with n > 1 becomes n of these).

    `num_computed_tokens` counts tokens whose KV is in the cache. The next step computes
    tokens [num_computed_tokens, ...) of `all_token_ids`; a step that reaches the end of
    them samples a new token. Preemption resets it to 0 (recompute).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 0
    # n > 1: the user-visible id and this sample's index in it.
    group_id: str = ""
    index: int = 0
    # A sibling whose prompt blocks this one waits for, so n samples share one prefill.
    wait_for: Request | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit on first scheduling; -1 before that
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    # Prompt positions whose logprobs were already reported (kept across preemptions).
    prompt_logprobs_done: int = 0
    # Sampled tokens appended as PLACEHOLDER whose values have not reached the host yet.
    num_placeholders: int = 0
    # Disaggregation. prefill_only: stop after the first token and keep the KV blocks
    # for a transfer (prefill side). kv_reserved: the request already holds its blocks
    # (filled by a transfer, or to be filled by a local prefill) when it is admitted.
    prefill_only: bool = False
    kv_reserved: bool = False
    # Prompt tokens whose KV is known to be written (reported to the KV sender).
    num_kv_ready: int = 0
    # Images of the prompt (vision-language models). With M-RoPE (Qwen2-VL) also the
    # prompt's [3, num_prompt_tokens] positions and the offset `mrope_delta` of every
    # later position (outputs), the same on all three axes.
    mm: MultimodalInputs | None = None
    mrope_positions: np.ndarray | None = None
    mrope_delta: int = 0
    # Structured outputs: the grammar state after the output tokens consumed so far
    # (rtpllm.engine.structured); None for unconstrained requests.
    grammar: GrammarMatcher | None = None

    def __post_init__(self) -> None:
        self._all: list[int] = list(self.prompt_token_ids)
        self.group_id = self.group_id or self.request_id

    @property
    def all_token_ids(self) -> list[int]:
        return self._all

    @property
    def block_extras(self) -> BlockExtras | None:
        """What block keys depend on besides tokens: the prompt's images, if any."""
        return self.mm.block_extras if self.mm is not None else None

    @property
    def num_tokens(self) -> int:
        return len(self._all)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True until every known token (prompt, and outputs after a preemption) is computed
        except possibly the last sampled one."""
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def max_output_tokens(self) -> int:
        """Output budget: max_tokens, capped by what fits in the context window."""
        room = self.max_model_len - self.num_prompt_tokens
        if self.params.max_tokens is None:
            return room
        return min(self.params.max_tokens, room)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values the host knows (all but in-flight placeholders)."""
        return len(self._all) - self.num_placeholders

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all.append(token_id)

    def append_placeholder(self) -> None:
        """A token was sampled on the device; its value arrives with resolve_placeholder."""
        self.append_output(PLACEHOLDER)
        self.num_placeholders += 1

    def resolve_placeholder(self, token_id: int) -> None:
        """Fill in the oldest placeholder (tokens resolve in the order they were sampled)."""
        index = len(self.output_token_ids) - self.num_placeholders
        self.output_token_ids[index] = token_id
        self._all[self.num_prompt_tokens + index] = token_id
        self.num_placeholders -= 1
