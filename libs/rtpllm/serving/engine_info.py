"""What an engine server needs from the engine it serves, as a small interface.

The combined worker serves an `AsyncLLMEngine`; benchmarks serve a zero-compute engine
through the same server. Both satisfy `ServedEngine`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rtpllm.outputs import RequestOutput
from rtpllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineInfo:
    """Static facts about a served engine, announced in heartbeats."""

    model: str  # the served model name clients ask for
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    block_size: int
    kv_namespace: bytes


class ServedEngine(Protocol):
    """The engine face an engine server drives (AsyncLLMEngine's subset).

    `generate` yields delta RequestOutputs, the last with finished=True; it raises
    ValueError for invalid input, and leaving the iteration early aborts the request.
    """

    def generate(self, request_id: str, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[RequestOutput]: ...

    def stats(self) -> Any: ...

    @property
    def is_alive(self) -> bool: ...

    async def shutdown(self) -> None: ...


def engine_info(engine: Any) -> EngineInfo:
    """EngineInfo of an `AsyncLLMEngine` (reads its synchronous engine's attributes)."""
    core = engine.engine
    return EngineInfo(
        model=core.served_model_name,
        max_model_len=core.max_model_len,
        vocab_size=core.model_config.vocab_size,
        max_num_seqs=core.config.scheduler.max_num_seqs,
        block_size=core.config.cache.block_size,
        kv_namespace=core.block_manager.namespace,
    )
