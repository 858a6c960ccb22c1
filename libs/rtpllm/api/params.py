"""OpenAI request fields -> SamplingParams (which validates the ranges)."""

from __future__ import annotations

from typing import Any

from rtpllm.api.errors import bad_request
from rtpllm.api.requests import ChatCompletionRequest, CompletionRequest, _SamplingFields
from rtpllm.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_N = 128  # samples per request: each one costs a sequence slot and KV
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def chat_sampling_params(req: ChatCompletionRequest) -> SamplingParams:
    if req.max_completion_tokens is not None and req.max_tokens is not None and req.max_completion_tokens != req.max_tokens:
        raise bad_request("Set max_completion_tokens or max_tokens, not both with different values.", "max_completion_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = None
    if req.logprobs:
        logprobs = req.top_logprobs or 0
    elif req.top_logprobs is not None and req.top_logprobs > 0:
        raise bad_request("top_logprobs needs logprobs to be true.", "top_logprobs")
    if req.tools:
        raise bad_request("Tool calling is not supported yet.", "tools")
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise bad_request(f"response_format {fmt!r} is not supported; only 'text' is.", "response_format")
    # Chat without max_tokens runs to the end of the context window, as OpenAI's does.
    return _build(req, max_tokens=max_tokens, logprobs=logprobs, logprobs_param="top_logprobs")


def completion_sampling_params(req: CompletionRequest) -> SamplingParams:
    if req.suffix:
        raise bad_request("suffix is not supported.", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (it must equal n).", "best_of")
    max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    # echo with logprobs reports the prompt's logprobs too.
    prompt_logprobs = req.logprobs if (req.echo and req.logprobs is not None) else None
    return _build(req, max_tokens=max_tokens, logprobs=req.logprobs, prompt_logprobs=prompt_logprobs, logprobs_param="logprobs")


def _build(
    req: _SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    logprobs_param: str,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    if req.logit_bias:
        raise bad_request("logit_bias is not supported.", "logit_bias")
    if not 1 <= req.n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {req.n}.", "n")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad_request(f"{logprobs_param} must be between 0 and {MAX_LOGPROBS}, got {logprobs}.", logprobs_param)
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    values: dict[str, Any] = {
        "n": req.n,
        "max_tokens": max_tokens,
        "min_tokens": req.min_tokens,
        "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        "stop_token_ids": list(req.stop_token_ids or []),
        "seed": req.seed,
        "ignore_eos": req.ignore_eos,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
    }
    # Unset optional fields keep SamplingParams' defaults (OpenAI's: temperature 1, top_p 1).
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            values[name] = value
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        param = message.split(" ", 1)[0]
        raise bad_request(message, param if param in values else None) from None
