"""The offline face: `LLM(model).generate(prompts, SamplingParams(...))`, like vLLM's."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from rtpllm.config import CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.outputs import CompletionOutput, RequestOutput
from rtpllm.sampling_params import SamplingParams
from rtpllm.tokenizer import Tokenizer

Prompt = str | Sequence[int]
Message = dict[str, Any]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LLM:
    """Runs an engine in-process and returns finished outputs, one per prompt, in order."""

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        dtype: str = "auto",
        device: str | None = None,
        *,
        max_model_len: int | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        gpu_memory_utilization: float = 0.85,
        cpu_kv_bytes: int = 1 << 30,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        seed: int = 0,
        attention_backend: str = "auto",
        load_format: str = "auto",
        cuda_graphs: bool = True,
        async_scheduling: bool | None = None,
        offload: OffloadConfig | None = None,
    ) -> None:
        config = EngineConfig(
            model=model,
            device=device or default_device(),
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            attention_backend=attention_backend,
            load_format=load_format,
            cuda_graphs=cuda_graphs,
            async_scheduling=async_scheduling,
            cache=CacheConfig(
                block_size=block_size,
                num_blocks=num_blocks,
                gpu_memory_utilization=gpu_memory_utilization,
                cpu_kv_bytes=cpu_kv_bytes,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
            offload=offload or OffloadConfig(),
        )
        self.engine = LLMEngine(config)
        self._ids = itertools.count()
        # Outputs accumulated so far for requests still running.
        self._partial: dict[str, RequestOutput] = {}

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string, a token-id list, or a list of either)."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        order: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list, strict=True):
                rid = f"offline-{next(self._ids)}"
                # Only finished results are returned here: skip per-step outputs.
                self.engine.add_request(rid, prompt, replace(params, output_kind="final"))
                order.append(rid)
            return self._run(order)
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            self.engine.step()  # drain the abort outputs
            raise

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [tok.encode_chat(conv, add_generation_prompt) for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def _run(self, order: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while len(done) < len(order):
            for delta in self.engine.step():
                acc = self._partial.setdefault(delta.request_id, _new_acc(delta))
                _accumulate(acc, delta)
                if delta.finished:
                    done[delta.request_id] = self._partial.pop(delta.request_id)
        return [done[rid] for rid in order]


def _new_acc(delta: RequestOutput) -> RequestOutput:
    return RequestOutput(
        request_id=delta.request_id,
        prompt_token_ids=delta.prompt_token_ids,
        outputs=[],
        finished=False,
        prompt=delta.prompt,
        prompt_logprobs=[] if delta.prompt_logprobs is not None else None,
    )


def _accumulate(acc: RequestOutput, delta: RequestOutput) -> None:
    """Fold a delta output into the running total for its request."""
    by_index = {o.index: o for o in acc.outputs}
    for d in delta.outputs:
        o = by_index.get(d.index)
        if o is None:
            o = CompletionOutput(index=d.index, text="", token_ids=[], logprobs=[] if d.logprobs is not None else None)
            acc.outputs.append(o)
            by_index[d.index] = o
        o.text += d.text
        o.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            o.logprobs = (o.logprobs or []) + d.logprobs
        o.cumulative_logprob = d.cumulative_logprob
        o.finish_reason = d.finish_reason
        o.stop_reason = d.stop_reason
    acc.outputs.sort(key=lambda o: o.index)
    if delta.prompt_logprobs:
        acc.prompt_logprobs = (acc.prompt_logprobs or []) + delta.prompt_logprobs
    acc.finished = delta.finished
    acc.num_cached_tokens = delta.num_cached_tokens
    acc.error = delta.error
    acc.metrics = delta.metrics
