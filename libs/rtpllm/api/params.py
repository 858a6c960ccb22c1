"""OpenAI request fields -> SamplingParams (which validates the ranges)."""

from __future__ import annotations

import dataclasses
from typing import Any

from rtpllm.api.errors import bad_request
from rtpllm.api.requests import ChatCompletionRequest, CompletionRequest, _SamplingFields
from rtpllm.api.structured import structured_outputs
from rtpllm.api.tools import ToolRequest, tool_request
from rtpllm.api.unsupported import check_supported
from rtpllm.sampling_params import MAX_LOGPROBS, SamplingParams
from rtpllm.structured.spec import StructuredOutputsParams
from rtpllm.tools.base import CallFormat
from rtpllm.tools.hermes import HermesParser

HERMES_FORMAT = HermesParser.call_format

MAX_N = 128  # samples per request: each one costs a sequence slot and KV
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def chat_sampling_params(
    req: ChatCompletionRequest, tools: ToolRequest | None = None, call_format: CallFormat = HERMES_FORMAT
) -> SamplingParams:
    """`tools`: the request's (tool_request), when the caller has them already;
    `call_format`: how the model writes calls (what "required" and named functions
    are forced into)."""
    check_supported(req)
    if tools is None:
        tools = tool_request(req)
    if req.max_completion_tokens is not None and req.max_tokens is not None and req.max_completion_tokens != req.max_tokens:
        raise bad_request("Set max_completion_tokens or max_tokens, not both with different values.", "max_completion_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = None
    if req.logprobs:
        logprobs = req.top_logprobs or 0
    elif req.top_logprobs is not None and req.top_logprobs > 0:
        raise bad_request("top_logprobs needs logprobs to be true.", "top_logprobs")
    # Chat without max_tokens runs to the end of the context window, as OpenAI's does.
    params = _build(
        req,
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=req.prompt_logprobs,
        logprobs_param="top_logprobs",
        forced=tools.constraint(call_format) if tools is not None else None,
    )
    if tools is not None and tools.parses and call_format.special_markers and "skip_special_tokens" not in req.model_fields_set:
        # The calls' markers are special tokens (Mistral's [TOOL_CALLS], [ARGS]): the
        # parser must see them, as vLLM's Mistral parser does.
        params = dataclasses.replace(params, skip_special_tokens=False)
    return params


def echo_only(req: CompletionRequest) -> bool:
    """`echo` with `max_tokens: 0`: the prompt (and its logprobs) back, nothing generated."""
    return req.echo and req.max_tokens == 0


def completion_sampling_params(req: CompletionRequest) -> SamplingParams:
    """The engine's parameters, which differ from what the client sees in two cases:
    `best_of` samples best_of candidates (with logprobs, which rank them) for n to be
    returned, and echo-only runs one token, dropped, to get the prompt's logprobs."""
    check_supported(req)
    if req.suffix:
        raise bad_request("suffix is not supported.", "suffix")
    best_of = req.best_of if req.best_of is not None else req.n
    if best_of < req.n:
        raise bad_request(f"best_of must be at least n ({req.n}), got {best_of}.", "best_of")
    if best_of > req.n and req.stream:
        raise bad_request("best_of cannot be used with stream: the best are known only at the end.", "best_of")
    max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    if echo_only(req):
        max_tokens = 1
    # echo with logprobs reports the prompt's logprobs too (vLLM's prompt_logprobs, if
    # also asked for, shows its own number of them from the same run).
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, req.logprobs)
    logprobs = req.logprobs
    if best_of > req.n and logprobs is None:
        logprobs = 0  # the chosen tokens' logprobs: their sum ranks the candidates
    return _build(
        req,
        n=best_of,
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logprobs_param="logprobs",
        n_param="best_of" if best_of != req.n else "n",
    )


def _build(
    req: _SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    logprobs_param: str,
    prompt_logprobs: int | None = None,
    n: int | None = None,
    n_param: str = "n",
    forced: StructuredOutputsParams | None = None,
) -> SamplingParams:
    """`forced`: the tool calls' grammar, which leaves no room for another constraint."""
    n = req.n if n is None else n
    if not 1 <= n <= MAX_N:
        raise bad_request(f"{n_param} must be between 1 and {MAX_N}, got {n}.", n_param)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad_request(f"{logprobs_param} must be between 0 and {MAX_LOGPROBS}, got {logprobs}.", logprobs_param)
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    values: dict[str, Any] = {
        "n": n,
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
        "speculative": req.speculative,
        "logit_bias": _logit_bias(req.logit_bias),
        "allowed_token_ids": req.allowed_token_ids,
        "structured_outputs": structured_outputs(req),  # 400 naming the field if invalid
    }
    if forced is not None:
        if values["structured_outputs"] is not None:
            raise bad_request(
                "tool_choice 'required' or a named function forces the output into tool calls; "
                "it cannot be combined with another structured-output constraint.",
                "tool_choice",
            )
        values["structured_outputs"] = forced
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


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's `{"token id": bias}` with integer keys (ranges: SamplingParams)."""
    if not raw:
        return None
    out: dict[int, float] = {}
    for key, bias in raw.items():
        token = key.strip()
        if not (token.isascii() and token.isdecimal()):
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias")
        out[int(token)] = float(bias)
    return out
