"""The NATS protocol: subjects, message round trips, versioning, engine <-> wire mapping."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtpllm.kvcache.events import AllBlocksCleared, BlocksRemoved, BlocksStored, KVEventBatch
from rtpllm.outputs import CompletionOutput, Logprob, RequestOutput
from rtpllm.protocol import subjects
from rtpllm.protocol.convert import (
    delta_from_output,
    params_from_spec,
    sampling_param_names,
    spec_from_params,
)
from rtpllm.protocol.messages import (
    CancelRequest,
    ChoiceDelta,
    DataPlaneEndpoint,
    DisaggCounters,
    Discover,
    ErrorCode,
    ErrorInfo,
    GatewayHeartbeat,
    GenerateRequest,
    Handoff,
    Heartbeat,
    InstanceLoad,
    KVEvents,
    KVLayoutSpec,
    KVStoreCounters,
    KVStoreGet,
    KVStoreGetReply,
    KVStoreHeartbeat,
    KVStoreLookup,
    KVStoreLookupReply,
    KVStorePing,
    KVStorePut,
    KVStorePutReply,
    Leave,
    PrefillResult,
    ProtocolError,
    SamplingSpec,
    SubmitReply,
    TokenDelta,
    TokenLogprob,
    TransferCounters,
    Usage,
    decode,
    encode,
)
from rtpllm.sampling_params import SamplingParams


def test_subjects_are_versioned_and_per_instance() -> None:
    assert subjects.PREFIX == f"rtpllm.v{subjects.PROTOCOL_VERSION}"
    assert subjects.generate_subject("w-1") == "rtpllm.v1.worker.w-1.generate"
    assert subjects.cancel_subject("w-1", subjects.InstanceRole.DECODE) == "rtpllm.v1.decode.w-1.cancel"
    assert subjects.deltas_subject("gw") == "rtpllm.v1.gateway.gw.deltas"
    assert subjects.kv_events_subject("w-1") == "rtpllm.v1.kv.w-1.events"
    assert subjects.kvstore_subject("host-1", subjects.KVStoreOp.GET) == "rtpllm.v1.kvstore.host-1.get"
    assert subjects.kvstore_subject("host-1", "ping") == "rtpllm.v1.kvstore.host-1.ping"
    assert subjects.subject_token("gpu-7.cluster.local") == "gpu-7-cluster-local"
    assert subjects.check_id(subjects.default_host_id()) == subjects.default_host_id()
    every = [subjects.HEARTBEAT, subjects.LEAVE, subjects.DISCOVER, subjects.GATEWAY_HEARTBEAT, subjects.KV_EVENTS_ALL, subjects.KVSTORE_HEARTBEAT]
    assert all(s.startswith(subjects.PREFIX + ".") for s in every)


@pytest.mark.parametrize("bad", ["", "a.b", "a*", "a>", "a b", "x" * 129])
def test_ids_must_be_one_subject_token(bad: str) -> None:
    with pytest.raises(ValueError):
        subjects.check_id(bad)
    assert subjects.check_id("worker-host_1-abc") == "worker-host_1-abc"


LAYOUT = KVLayoutSpec(namespace=b"ns", num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="bfloat16")
ENDPOINT = DataPlaneEndpoint(host="127.0.0.1", port=5, host_id="h", device="cpu", backends=["shm", "tcp"])


def _messages() -> list[msgspec.Struct]:
    batch = KVEventBatch(
        engine_id="w", seq=3, events=[BlocksStored([b"k" * 16], None, 16), BlocksRemoved([b"j" * 16]), AllBlocksCleared()]
    )
    return [
        GenerateRequest(request_id="r", model="m", prompt_token_ids=[1, 2], sampling=SamplingSpec(n=2, stop=["x"]), reply_to="s", gateway_id="g", deadline=1.5),
        SubmitReply(request_id="r", accepted=False, error=ErrorInfo(ErrorCode.INVALID_REQUEST, "no")),
        TokenDelta(
            request_id="r",
            seq=4,
            choices=[ChoiceDelta(index=1, text="hi", token_ids=[5], logprobs=[[TokenLogprob(5, -0.1, 1, "h")]], finish_reason="stop", stop_reason=7)],
            prompt_logprobs=[None, [TokenLogprob(2, -1.0, 3, None)]],
            finished=True,
            usage=Usage(2, 1, 0),
        ),
        CancelRequest(request_id="r"),
        Heartbeat(instance_id="w", model="m", max_model_len=8, max_num_seqs=4, block_size=16, kv_namespace=b"ns", lease_s=3.0, seq=1, load=InstanceLoad(num_running=2, kv_usage=0.5)),
        Leave(instance_id="w"),
        Discover(gateway_id="g"),
        GatewayHeartbeat(gateway_id="g", lease_s=3.0),
        KVEvents(instance_id="w", model="m", batch=batch),
        GenerateRequest(
            request_id="r", model="m", prompt_token_ids=[1], sampling=SamplingSpec(), reply_to="s", gateway_id="g", deadline=2.0,
            handoff=Handoff(
                decode_instance_id="d", transfer_id="r.0.ab", skip_blocks=2, num_blocks=3, lease_s=30.0, transfer_token=b"\x07" * 16,
                endpoint=DataPlaneEndpoint(host="127.0.0.1", port=5, host_id="h", device="cpu", backends=["shm", "tcp"]),
            ),
        ),
        PrefillResult(request_id="r", transfer_id="t", prefill_instance_id="p", token_id=9, logprobs=(-0.5, 1, [9, 3], [-0.5, -2.0]), num_cached_tokens=16),
        PrefillResult(request_id="r", transfer_id="t", prefill_instance_id="p", error=ErrorInfo(ErrorCode.ENGINE_ERROR, "x")),
        KVStoreLookup(layout=LAYOUT, keys=[b"k" * 16, b"j" * 16]),
        KVStoreLookupReply(tiers=["host", "ssd", "redis"]),
        KVStoreLookupReply(error=ErrorInfo(ErrorCode.INVALID_REQUEST, "bad layout")),
        KVStoreGet(layout=LAYOUT, keys=[b"k" * 16], endpoint=ENDPOINT, transfer_id="get-1", lease_s=5.0, transfer_token=b"t" * 16),
        KVStoreGetReply(count=3, more=True),
        KVStorePut(layout=LAYOUT, keys=[b"k" * 16, b"j" * 16]),
        KVStorePutReply(endpoint=ENDPOINT, transfer_id="put-1", transfer_token=b"t" * 16, positions=[1], lease_s=10.0),
        KVStorePutReply(),
        KVStorePing(),
        KVStoreHeartbeat(
            host_id="host-1", kvstore_id="abc", seq=4, lease_s=3.0, started_at=1.5, tiers=["host", "ssd"], host_blocks=2,
            host_used_bytes=10, host_capacity_bytes=100, counters=KVStoreCounters(lookups=1, gets=2, blocks_sent=3, puts=4),
        ),
        Heartbeat(
            instance_id="d", role="decode", model="m", max_model_len=8, max_num_seqs=4, block_size=16, lease_s=3.0, seq=2,
            disagg=DisaggCounters(local_prefills=1, remote_prefills=2, transfers={"shm": TransferCounters(transfers=2, bytes=10, seconds=0.5)}),
        ),
    ]


@pytest.mark.parametrize("message", _messages(), ids=lambda m: type(m).__name__)
def test_round_trip(message: msgspec.Struct) -> None:
    assert decode(encode(message), type(message)) == message


def test_other_version_and_garbage_are_protocol_errors() -> None:
    data = encode(CancelRequest(v=2, request_id="r"))
    with pytest.raises(ProtocolError, match="version 2"):
        decode(data, CancelRequest)
    with pytest.raises(ProtocolError):
        decode(b"\xc1garbage", TokenDelta)
    with pytest.raises(ProtocolError):
        decode(encode(Leave(instance_id="w")), TokenDelta)  # a different message


def test_added_fields_are_compatible() -> None:
    """A newer peer's extra field is ignored; a missing defaulted field is filled."""

    class NewerCancel(msgspec.Struct, kw_only=True):
        v: int = 1
        request_id: str
        reason: str = "cancelled"
        migrate_to: str = "decode-7"

    assert decode(encode(NewerCancel(request_id="r")), CancelRequest) == CancelRequest(request_id="r")
    assert decode(msgspec.msgpack.encode({"v": 1, "request_id": "r"}), CancelRequest).reason == ErrorCode.CANCELLED


def test_sampling_spec_mirrors_sampling_params() -> None:
    params_fields, spec_fields = sampling_param_names()
    assert params_fields == spec_fields
    defaults = spec_from_params(SamplingParams())
    assert defaults == SamplingSpec()


@given(
    n=st.integers(1, 4),
    temperature=st.floats(0, 2),
    top_p=st.floats(0.01, 1),
    top_k=st.integers(0, 50),
    seed=st.none() | st.integers(0, 2**62),
    stop=st.lists(st.text(min_size=1, max_size=4), max_size=3),
    max_tokens=st.none() | st.integers(1, 4096),
    logprobs=st.none() | st.integers(0, 20),
)
def test_sampling_params_survive_the_wire(n, temperature, top_p, top_k, seed, stop, max_tokens, logprobs) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, max_tokens=max_tokens, logprobs=logprobs)
    assert params_from_spec(decode(encode(spec_from_params(params)), SamplingSpec)) == params


def test_invalid_spec_raises_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="top_p"):
        params_from_spec(SamplingSpec(top_p=0.0))


def test_delta_from_output_keeps_logprob_order_and_errors() -> None:
    position = {9: Logprob(-2.0, 4, "z"), 3: Logprob(-0.5, 1, "a"), 4: Logprob(-1.0, 2, "b")}
    out = RequestOutput(
        request_id="r",
        prompt_token_ids=[1, 2],
        outputs=[CompletionOutput(index=0, text="z", token_ids=[9], cumulative_logprob=-2.0, logprobs=[position], finish_reason="length")],
        finished=True,
        prompt_logprobs=[None, {2: Logprob(-3.0, 7, None)}],
    )
    delta = delta_from_output(out, 5)
    assert delta.seq == 5 and delta.finished
    [choice] = delta.choices
    assert [e.token_id for e in choice.logprobs[0]] == [9, 3, 4]  # sampled token first
    assert choice.finish_reason == "length"
    assert delta.prompt_logprobs == [None, [TokenLogprob(2, -3.0, 7, None)]]
    assert delta.error is None
    out.error = "engine step failed: boom"
    assert delta_from_output(out, 6).error == ErrorInfo(ErrorCode.ENGINE_ERROR, "engine step failed: boom")
