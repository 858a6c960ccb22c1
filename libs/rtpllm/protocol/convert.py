"""Conversions between engine objects and wire messages (both directions live here so the
mapping is written once)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import msgspec

from rtpllm.outputs import PositionLogprobs as EnginePositionLogprobs
from rtpllm.outputs import RequestOutput
from rtpllm.protocol.messages import (
    ChoiceDelta,
    ErrorCode,
    ErrorInfo,
    KVLayoutSpec,
    PositionLogprobs,
    SamplingSpec,
    StructuredOutputsSpec,
    TokenDelta,
    TokenLogprob,
)
from rtpllm.sampling_params import SamplingParams
from rtpllm.structured.spec import StructuredOutputsParams

if TYPE_CHECKING:
    from rtpllm.transfer.layout import KVLayout

_SPEC_FIELDS = tuple(msgspec.structs.fields(SamplingSpec))
_STRUCTURED_FIELDS = tuple(f.name for f in msgspec.structs.fields(StructuredOutputsSpec))


def spec_from_params(params: SamplingParams) -> SamplingSpec:
    values = {f.name: getattr(params, f.name) for f in _SPEC_FIELDS}
    structured = params.structured_outputs
    if structured is not None:
        wire = {name: getattr(structured, name) for name in _STRUCTURED_FIELDS}
        wire["choice"] = list(structured.choice) if structured.choice is not None else None
        values["structured_outputs"] = StructuredOutputsSpec(**wire)
    return SamplingSpec(**values)


def params_from_spec(spec: SamplingSpec) -> SamplingParams:
    """Rebuild (and so re-validate) SamplingParams; raises ValueError naming a bad field."""
    values = {f.name: getattr(spec, f.name) for f in _SPEC_FIELDS}
    if spec.structured_outputs is not None:
        wire = spec.structured_outputs
        fields = {name: getattr(wire, name) for name in _STRUCTURED_FIELDS}
        values["structured_outputs"] = StructuredOutputsParams(**fields)
    return SamplingParams(**values)


def sampling_param_names() -> tuple[set[str], set[str]]:
    """(SamplingParams fields, SamplingSpec fields): tests check they stay equal."""
    return {f.name for f in dataclasses.fields(SamplingParams)}, {f.name for f in _SPEC_FIELDS}


def position_to_wire(position: EnginePositionLogprobs) -> PositionLogprobs:
    # The engine puts the sampled/prompt token first; dict order is kept on the wire.
    return [TokenLogprob(tid, lp.logprob, lp.rank, lp.decoded_token) for tid, lp in position.items()]


def delta_from_output(output: RequestOutput, seq: int) -> TokenDelta:
    """One engine delta output -> one wire delta. Usage goes on the last one."""
    choices = []
    completion_tokens = 0
    for out in output.outputs:
        completion_tokens += len(out.token_ids)
        choices.append(
            ChoiceDelta(
                index=out.index,
                text=out.text,
                token_ids=list(out.token_ids),
                logprobs=[position_to_wire(p) for p in out.logprobs] if out.logprobs is not None else None,
                cumulative_logprob=out.cumulative_logprob,
                finish_reason=out.finish_reason,
                stop_reason=out.stop_reason,
            )
        )
    prompt_logprobs = None
    if output.prompt_logprobs is not None:
        prompt_logprobs = [position_to_wire(p) if p is not None else None for p in output.prompt_logprobs]
    error = ErrorInfo(ErrorCode.ENGINE_ERROR, output.error) if output.error else None
    return TokenDelta(
        request_id=output.request_id,
        seq=seq,
        choices=choices,
        prompt_logprobs=prompt_logprobs,
        finished=output.finished,
        error=error,
    )


def layout_spec(layout: KVLayout) -> KVLayoutSpec:
    """The wire form of a `rtpllm.transfer.KVLayout`."""
    return KVLayoutSpec(**{f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)})


def layout_from_spec(spec: KVLayoutSpec) -> KVLayout:
    """A KVLayout from its wire form; ValueError if it names no valid layout."""
    import torch  # here, not at import: the gateway uses this module without torch

    from rtpllm.transfer.layout import KVLayout

    if min(spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim) < 1:
        raise ValueError(f"bad KV layout: {spec}")
    if not isinstance(getattr(torch, spec.dtype, None), torch.dtype):
        raise ValueError(f"bad KV layout: unknown dtype {spec.dtype!r}")
    layout = KVLayout(**msgspec.structs.asdict(spec))
    if layout.mixed:
        try:
            layout.block_bytes  # noqa: B018 -- sizes every layer: unknown formats raise here
        except (ValueError, KeyError) as exc:
            raise ValueError(f"bad KV layout: layer formats {list(spec.layer_formats)}: {exc}") from None
    return layout
