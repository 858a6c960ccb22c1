"""The offline face: `LLM(model).generate(prompts, SamplingParams(...))`, like vLLM's.

Images (vision-language models) come in two forms: OpenAI-style chat messages whose
content has `image_url` parts with `data:` URLs (`chat`), or vLLM-style prompt dicts
`{"prompt": text with one image token per image, "multi_modal_data": {"image": [...]}}`
(`generate`). Both end in token ids plus `MultimodalInputs` for the engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from rtpllm.config import CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig, SpeculativeConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.outputs import CompletionOutput, RequestOutput
from rtpllm.sampling_params import SamplingParams
from rtpllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from PIL import Image

    from rtpllm.multimodal.image_input import DecodedImage
    from rtpllm.multimodal.inputs import MultimodalInputs


class MultimodalPrompt(TypedDict, total=False):
    """A prompt with images, vLLM style. `prompt` is the text as the model's chat template
    renders it, with one image token per image (`<|image_pad|>` inside
    `<|vision_start|>...<|vision_end|>` for Qwen2-VL, `<image>` for Idefics3), which is
    expanded to the image's placeholder tokens. `multi_modal_data["image"]`: the images
    (PIL images or `DecodedImage`s) in prompt order."""

    prompt: str
    multi_modal_data: dict[str, Any]


Prompt = str | Sequence[int] | MultimodalPrompt
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
        kv_cache_dtype: str = "auto",
        kv_cache_plan: str | None = None,
        kv_cache_dtype_skip_layers: tuple[int, ...] = (),
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        seed: int = 0,
        attention_backend: str = "auto",
        load_format: str = "auto",
        cuda_graphs: bool = True,
        mixed_cuda_graphs: bool | None = None,
        async_scheduling: bool | None = None,
        offload: OffloadConfig | None = None,
        tensor_parallel_size: int = 1,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        """`tensor_parallel_size` > 1 splits the model over that many processes (this one is
        rank 0 and starts the others; on CUDA, devices device..device+N-1): `close()` the
        LLM, or use it as a context manager, to end them (docs/tensor_parallel.md)."""
        config = EngineConfig(
            model=model,
            device=device or default_device(),
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            attention_backend=attention_backend,
            load_format=load_format,
            cuda_graphs=cuda_graphs,
            mixed_cuda_graphs=mixed_cuda_graphs,
            async_scheduling=async_scheduling,
            cache=CacheConfig(
                block_size=block_size,
                num_blocks=num_blocks,
                gpu_memory_utilization=gpu_memory_utilization,
                cpu_kv_bytes=cpu_kv_bytes,
                enable_prefix_caching=enable_prefix_caching,
                kv_cache_dtype=kv_cache_dtype,
                kv_cache_plan=kv_cache_plan,
                kv_cache_dtype_skip_layers=tuple(kv_cache_dtype_skip_layers),
            ),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
            offload=offload or OffloadConfig(),
            tensor_parallel_size=tensor_parallel_size,
            speculative=speculative or SpeculativeConfig(),
        )
        self.engine = LLMEngine(config)
        self._ids = itertools.count()
        # Outputs accumulated so far for requests still running.
        self._partial: dict[str, RequestOutput] = {}

    def close(self) -> None:
        """Release the engine: flush the KV tiers, stop the other tensor-parallel ranks."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string, a token-id list, a `MultimodalPrompt`
        dict, or a list of these)."""
        if isinstance(prompts, str | dict) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        items = [self._image_prompt(p) if isinstance(p, dict) else (p, None) for p in prompts]  # type: ignore[union-attr]
        return self._submit(items, sampling_params)

    def _submit(
        self,
        items: list[tuple[str | Sequence[int], MultimodalInputs | None]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError(f"got {len(items)} prompts but {len(params_list)} sampling params")
        order: list[str] = []
        try:
            for (prompt, mm), params in zip(items, params_list, strict=True):
                rid = f"offline-{next(self._ids)}"
                # Only finished results are returned here: skip per-step outputs.
                self.engine.add_request(rid, prompt, replace(params, output_kind="final"), multimodal=mm)
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
        *,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them.

        A message's content may be a string or a list of OpenAI content parts: `text`
        parts, and for vision-language models `image_url` parts whose url is a `data:`
        URL (`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`).
        Message text is tokenized without special tokens (see Tokenizer.encode_chat).

        As vLLM's `LLM.chat`: `tools` (OpenAI function tools) are rendered by the
        template, `continue_final_message` continues the last (assistant) message
        instead of starting a new one, and `chat_template_kwargs` are extra template
        variables (Qwen3's `enable_thinking`). The output is the model's text; reading
        tool calls from it is the server's job (rtpllm.tools parses them).
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message continues the last message: set add_generation_prompt=False")
        render: dict[str, Any] = dict(chat_template_kwargs or {})
        if tools:
            render["tools"] = tools
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        items: list[tuple[str | Sequence[int], MultimodalInputs | None]] = []
        for conv in conversations:
            rendered, images = _take_images(conv)  # type: ignore[arg-type]
            if images and self.engine.vision is None:
                raise ValueError(f"model {self.engine.served_model_name!r} does not take images")
            ids = tok.encode_chat(rendered, add_generation_prompt, continue_final_message=continue_final_message, **render)
            items.append(self._expand_images(ids, images) if images else (ids, None))
        return self._submit(items, sampling_params)

    def _image_prompt(self, prompt: MultimodalPrompt) -> tuple[list[int], MultimodalInputs | None]:
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer; multimodal prompts are text")
        images = (prompt.get("multi_modal_data") or {}).get("image") or []
        images = images if isinstance(images, list | tuple) else [images]
        # The caller writes this text, image tokens included (vLLM's convention).
        ids = tok.encode(prompt["prompt"])
        return self._expand_images(ids, images) if images else (ids, None)

    def _expand_images(
        self, ids: list[int], images: Sequence[Image.Image | DecodedImage]
    ) -> tuple[list[int], MultimodalInputs]:
        from rtpllm.multimodal.prompt import expand_image_prompt

        family, tok = self.engine.vision, self.engine.tokenizer
        if family is None or tok is None:
            raise ValueError(f"model {self.engine.served_model_name!r} does not take images")
        return expand_image_prompt(family, tok, ids, images)

    def _run(self, order: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while len(done) < len(order):
            for delta in self.engine.step():
                acc = self._partial.setdefault(delta.request_id, _new_acc(delta))
                _accumulate(acc, delta)
                if delta.finished:
                    done[delta.request_id] = self._partial.pop(delta.request_id)
        return [done[rid] for rid in order]


def _take_images(conversation: list[Message]) -> tuple[list[Message], list[DecodedImage]]:
    """The conversation with each `image_url` part replaced by the `{"type": "image"}`
    part chat templates render as an image token, and the decoded images in order."""
    from rtpllm.multimodal.image_input import decode_data_url

    images: list[DecodedImage] = []
    out: list[Message] = []
    for message in conversation:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise ValueError("offline chat takes images as data: URLs (image_url.url = 'data:image/...;base64,...')")
                images.append(decode_data_url(url))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, images


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
