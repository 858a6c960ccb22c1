"""Every message that crosses a process boundary over NATS, as msgspec Structs.

Encoding is msgpack (compact, fast, no pickle). Each message carries `v`, the protocol
version, and its subject carries it too (see subjects.py).

Compatibility rule within one version: a field may be *added* with a default (old
readers ignore it, new readers fill the default); renaming, removing or changing the
meaning of a field bumps PROTOCOL_VERSION. That leaves room for what comes next without
a version bump: e.g. prefill/decode hand-off fields on GenerateRequest, data-plane
addresses on Heartbeat.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from rtpllm.kvcache.events import KVEventBatch
from rtpllm.protocol.subjects import PROTOCOL_VERSION, InstanceRole


class ProtocolError(ValueError):
    """A message that does not decode as the expected type or has another version."""


class MessageTooLarge(ProtocolError):
    """A message that does not fit the NATS server's max_payload (1 MiB by default).

    Raised before anything is sent, naming the message type and both sizes: the server
    would refuse it on every retry. What grows with a pool (snapshots, KV events, kvstore
    key lists) goes out in parts instead (protocol/parts.py)."""

    def __init__(self, message_type: str, size: int, max_payload: int) -> None:
        super().__init__(
            f"a {message_type} message of {size} bytes exceeds the NATS server's max_payload of {max_payload} bytes"
        )
        self.message_type = message_type
        self.size = size
        self.max_payload = max_payload


class ErrorCode:
    """Machine-readable error codes carried by ErrorInfo (strings on the wire, so a newer
    peer's unknown code still decodes)."""

    INVALID_REQUEST = "invalid_request"  # bad parameters/prompt: the client's fault (HTTP 400)
    MODEL_MISMATCH = "model_mismatch"  # the instance serves another model
    DRAINING = "draining"  # the instance is shutting down and takes no new requests
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the request's deadline passed (HTTP 504)
    ENGINE_ERROR = "engine_error"  # the engine failed the request or died
    WORKER_SHUTDOWN = "worker_shutdown"  # the instance stopped before the request finished
    WORKER_LOST = "worker_lost"  # the instance's lease expired (killed, hung, partitioned)
    LOST_DELTAS = "lost_deltas"  # a gap in a stream's sequence numbers (slow consumer)
    OVERLOADED = "overloaded"  # the instance's queue is full: try another, or HTTP 429
    CANCELLED = "cancelled"


class ErrorInfo(msgspec.Struct, frozen=True):
    code: str
    message: str


class StructuredOutputsSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """`rtpllm.structured.StructuredOutputsParams` on the wire: exactly one field set.
    `json` is the schema's JSON text (as the params keep it)."""

    json: str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False


class SamplingSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """`rtpllm.sampling_params.SamplingParams` on the wire: same names and defaults
    (a unit test keeps the two in step). Convert with rtpllm.protocol.convert."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsSpec | None = None
    output_kind: str = "delta"  # "final": one delta when the request ends (non-streaming)
    # Added within v1 (omitted at its default, so older peers see the same messages).
    speculative: bool = True  # False: the engine never speculates for this request


class DataPlaneEndpoint(msgspec.Struct, kw_only=True):
    """Where a decode instance receives KV (rtpllm.transfer.KVEndpoint on the wire)."""

    host: str
    port: int
    host_id: str
    device: str
    backends: list[str]


class Handoff(msgspec.Struct, kw_only=True):
    """Decode instance -> prefill instance, inside a GenerateRequest: prefill the prompt,
    send the first token to the gateway (`reply_to`, seq 0) and to the decode instance
    (a PrefillResult on `prefilled_subject(decode_instance_id)`), and ship the prompt's
    KV blocks from `skip_blocks` on (the decode instance holds the ones before) to
    `endpoint` as transfer `transfer_id` of `num_blocks` blocks, opened with
    `transfer_token` (the receiver's one-time token for it; docs/transfer.md)."""

    decode_instance_id: str
    transfer_id: str
    endpoint: DataPlaneEndpoint
    skip_blocks: int
    num_blocks: int
    lease_s: float
    # Added within v1: a sender without it is refused by the data plane, as it should be.
    transfer_token: bytes = b""


class ImageSpec(msgspec.Struct, kw_only=True, frozen=True):
    """One image of a prompt (rtpllm.multimodal.inputs.ImageInput on the wire, less its
    tensors). `content_hash`: digest of the image's bytes, the key of its embedding
    everywhere (block-key extras, embedding caches). `runs`: (offset, length) of the
    prompt's placeholder runs it fills, in order. `grid_thw`: Qwen2-VL's patch grid.
    `data`: the encoded image (PNG, JPEG, ...) as the client sent it, already decoded
    and checked against the limits once by the gateway; compressed bytes are all that
    crosses NATS for an image (pixels and embeddings never do: rule 2). Empty where the
    receiver needs no pixels (an embedding lookup by hash)."""

    content_hash: str
    runs: list[tuple[int, int]]
    grid_thw: tuple[int, int, int] | None = None
    data: bytes = b""


class GenerateRequest(msgspec.Struct, kw_only=True):
    """Gateway -> engine instance, as a NATS request on `generate_subject(instance)`.

    The instance answers the NATS request at once with a SubmitReply, then publishes
    TokenDeltas to `reply_to`. `deadline` is wall-clock Unix time (hosts need roughly
    synchronized clocks; the gateway enforces it too). A decode instance sends the same
    message to a prefill instance with `handoff` set.
    """

    v: int = PROTOCOL_VERSION
    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    reply_to: str
    gateway_id: str
    deadline: float
    handoff: Handoff | None = None
    # Added within v1: the prompt's images, in prompt order (vision-language models).
    images: list[ImageSpec] = []


class PrefillResult(msgspec.Struct, kw_only=True):
    """Prefill instance -> decode instance: the first token of a handed-off request
    (sent before it goes to the gateway), or why the prefill failed. `finished`: the
    first token ended the request (EOS, stop, max_tokens=1), so no KV follows.
    `logprobs`: the first token's (logprob, rank, top ids, top logprobs), if asked."""

    v: int = PROTOCOL_VERSION
    request_id: str
    transfer_id: str
    prefill_instance_id: str
    token_id: int = -1
    logprobs: tuple[float, int, list[int], list[float]] | None = None
    num_cached_tokens: int = 0
    finished: bool = False
    error: ErrorInfo | None = None


class SubmitReply(msgspec.Struct, kw_only=True):
    """The instance's immediate answer to a GenerateRequest: accepted, or why not."""

    v: int = PROTOCOL_VERSION
    request_id: str
    accepted: bool
    error: ErrorInfo | None = None


class TokenLogprob(msgspec.Struct, array_like=True, frozen=True):
    token_id: int
    logprob: float
    rank: int
    text: str | None = None


# One position: the sampled (or prompt) token first, then the top-k alternatives by rank.
PositionLogprobs = list[TokenLogprob]


class ChoiceDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """New output of one of the n samples since the previous delta."""

    index: int
    text: str = ""
    token_ids: list[int] = []
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


class TokenDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Engine instance -> gateway, on the gateway's deltas subject.

    `seq` counts 0, 1, 2, ... per request: NATS core may drop messages for a slow
    consumer, and a gap must end the stream with an error rather than corrupt it. The
    last delta has `finished=True` and carries `usage`, or `error` if the request failed.
    """

    v: int = PROTOCOL_VERSION
    request_id: str
    seq: int
    choices: list[ChoiceDelta] = []
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    finished: bool = False
    usage: Usage | None = None
    error: ErrorInfo | None = None


class CancelRequest(msgspec.Struct, kw_only=True):
    """Gateway -> instance: stop a request now and free its KV (client gone, deadline)."""

    v: int = PROTOCOL_VERSION
    request_id: str
    reason: str = ErrorCode.CANCELLED


class StatusQuery(msgspec.Struct, kw_only=True):
    """Gateway -> instance: which of these requests (this gateway's streams that have
    been quiet for a while) is the instance still running? A request it no longer runs
    whose final delta never arrived lost it in transit (a NATS restart, say)."""

    v: int = PROTOCOL_VERSION
    gateway_id: str
    request_ids: list[str]


class StatusReply(msgspec.Struct, kw_only=True):
    """Instance -> gateway: the subset of the asked request ids it is still running."""

    v: int = PROTOCOL_VERSION
    running: list[str]


class TransferCounters(msgspec.Struct, kw_only=True):
    """KV transfers of one data-plane backend since the instance started."""

    transfers: int = 0
    failures: int = 0
    bytes: int = 0
    seconds: float = 0.0


class DisaggCounters(msgspec.Struct, kw_only=True):
    """Disaggregation counters of a prefill or decode instance since it started."""

    local_prefills: int = 0  # decode: prompts prefilled here (short, or no prefill instance)
    remote_prefills: int = 0  # decode: prompts whose KV came from a prefill instance
    remote_fallbacks: int = 0  # decode: remote prefills that failed and were redone here
    transfers: dict[str, TransferCounters] = {}  # backend -> counters (sent or received)


class ImageCounters(msgspec.Struct, kw_only=True):
    """How an instance of a vision-language model got its requests' image embeddings,
    since it started (images)."""

    remote: int = 0  # from the vision service
    local: int = 0  # decoded here, for this engine's own tower
    fallbacks: int = 0  # requests the vision service failed, encoded here instead
    encoded_here: int = 0  # images this engine's tower ran (prefix-cache hits skip it)


class InstanceLoad(msgspec.Struct, kw_only=True):
    """An instance's load as of its last engine step (EngineStats plus server counts)."""

    num_running: int = 0
    num_waiting: int = 0
    num_inflight: int = 0  # requests the server holds (accepted, not yet finished)
    kv_usage: float = 0.0
    num_free_blocks: int = 0
    num_blocks: int = 0
    prefix_hit_ratio: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    num_awaiting_kv: int = 0
    num_held_kv: int = 0
    prefix_queried_tokens: int = 0
    # KV tier ("gpu", "host", "ssd", "redis") -> prompt tokens not recomputed
    tier_hit_tokens: dict[str, int] = {}
    # Speculative decoding (zero/empty when off): draft tokens proposed and accepted,
    # verifications by accepted drafts, and draft lengths chosen per request-step.
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_acceptance_lengths: dict[int, int] = {}
    spec_chosen_k: dict[int, int] = {}


class Heartbeat(msgspec.Struct, kw_only=True):
    """Registration and lease renewal of an engine instance, sent every interval.

    The first heartbeat registers the instance; a gateway drops an instance it has not
    heard from for `lease_s` seconds and fails the streams it was serving.
    `kv_namespace`/`block_size` let a router compute the instance's block keys, and
    `kv_event_seq` (last KV event batch published, -1 before any) lets it spot a gap.
    """

    v: int = PROTOCOL_VERSION
    instance_id: str
    role: str = InstanceRole.WORKER.value
    model: str
    max_model_len: int
    max_num_seqs: int
    block_size: int
    kv_namespace: bytes = b""
    lease_s: float
    seq: int
    state: str = "ready"  # "ready" | "draining" (finishing its requests, takes no new ones)
    started_at: float = 0.0
    kv_event_seq: int = -1
    load: InstanceLoad = msgspec.field(default_factory=InstanceLoad)
    disagg: DisaggCounters | None = None
    # The host whose kvstore service holds this instance's KV tiers ("" = none or its
    # own): a router credits the kvstore's host-tier blocks (its KV events) to it.
    kvstore_host: str = ""
    images: ImageCounters | None = None  # vision-language models only


class Leave(msgspec.Struct, kw_only=True):
    """An instance stops: drop it now, and fail whatever it still serves."""

    v: int = PROTOCOL_VERSION
    instance_id: str
    reason: str = "shutdown"


class Discover(msgspec.Struct, kw_only=True):
    """A gateway (re)started: every instance answers with a heartbeat at once."""

    v: int = PROTOCOL_VERSION
    gateway_id: str


class GatewayHeartbeat(msgspec.Struct, kw_only=True):
    """A gateway's lease on the requests it started: an instance aborts the requests of a
    gateway it has not heard from for `lease_s` seconds, freeing their KV."""

    v: int = PROTOCOL_VERSION
    gateway_id: str
    lease_s: float


class KVEvents(msgspec.Struct, kw_only=True):
    """One engine step's prefix-cache changes (`rtpllm.kvcache.events`), in an envelope
    naming the instance and model; `batch.seq` increases by one per batch.

    A batch larger than the server's max_payload goes out as `parts` messages of one
    `seq`, `part` 0, 1, ..., each with a run of the events (a long BlocksStored or
    BlocksRemoved cut into shorter ones); the receiver applies the batch once it has
    every part (protocol/parts.py). Added within v1: an older reader sees each part as
    the whole batch, and the next part as an already-applied seq."""

    v: int = PROTOCOL_VERSION
    instance_id: str
    model: str
    batch: KVEventBatch
    part: int = 0
    parts: int = 1


class KVSnapshotRequest(msgspec.Struct, kw_only=True):
    """A router lost track of an instance's KV events (a gap, or it joined late)."""

    v: int = PROTOCOL_VERSION
    gateway_id: str


class KVSnapshot(msgspec.Struct, kw_only=True):
    """Every block key in an instance's prefix cache (and host-memory tier), as of its
    KV event batch `seq` (later batches apply on top).

    A snapshot larger than the server's max_payload is answered as `parts` replies,
    `part` 0, 1, ..., each with a run of the keys; the asker replaces its view only once
    it has all of them, and asks again later if one is missing (protocol/parts.py).
    Added within v1: an older asker takes the first part for the whole snapshot (a
    partial view, which costs routing quality only, where before it got nothing)."""

    v: int = PROTOCOL_VERSION
    instance_id: str
    seq: int
    block_keys: list[bytes]
    host_block_keys: list[bytes] = []  # in the instance's host-memory tier
    part: int = 0
    parts: int = 1


# -- the kvstore service (docs/kvstore.md): metadata here, KV bytes over the data plane --


class KVLayoutSpec(msgspec.Struct, kw_only=True, frozen=True):
    """`rtpllm.transfer.KVLayout` on the wire: the asking engine's block layout and
    namespace (the kvstore keeps one staging pool per layout)."""

    namespace: bytes
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    # A mixed per-layer KV plan: each layer's stored format (empty: one format).
    layer_formats: tuple[str, ...] = ()


class KVStoreLookup(msgspec.Struct, kw_only=True):
    """Engine -> kvstore: which of these chained block keys are stored, and where."""

    v: int = PROTOCOL_VERSION
    layout: KVLayoutSpec
    keys: list[bytes]


class KVStoreLookupReply(msgspec.Struct, kw_only=True):
    """The tier ("host", "ssd", "redis") of each key of the longest stored prefix of
    the asked keys (`TieredKVStore.lookup`); advisory, a get may still miss."""

    v: int = PROTOCOL_VERSION
    tiers: list[str] = []
    error: ErrorInfo | None = None


class KVStoreGet(msgspec.Struct, kw_only=True):
    """Engine -> kvstore: send the blocks of `keys` to the engine's KVReceiver at
    `endpoint` as transfer `transfer_id`, positions 0, 1, ... in key order. The engine
    has already called `expect(transfer_id, its block ids, lease_s, allow_fewer=True)`,
    so the kvstore may open the transfer with fewer blocks (a leading part), with
    `transfer_token`, the one-time token that `expect()` issued."""

    v: int = PROTOCOL_VERSION
    layout: KVLayoutSpec
    keys: list[bytes]
    endpoint: DataPlaneEndpoint
    transfer_id: str
    lease_s: float
    transfer_token: bytes = b""


class KVStoreGetReply(msgspec.Struct, kw_only=True):
    """How many leading keys the kvstore sends (0: none, nothing will be opened).
    `more`: it stopped short for lack of staging space, not at a missing key (ask again
    for the rest)."""

    v: int = PROTOCOL_VERSION
    count: int = 0
    more: bool = False
    error: ErrorInfo | None = None


class KVStorePut(msgspec.Struct, kw_only=True):
    """Engine -> kvstore: the engine wants to store these blocks."""

    v: int = PROTOCOL_VERSION
    layout: KVLayoutSpec
    keys: list[bytes]


class KVStorePutReply(msgspec.Struct, kw_only=True):
    """Where to send them: transfer `transfer_id` to the kvstore's KVReceiver at
    `endpoint`, position i carrying the block of `keys[positions[i]]` (keys the kvstore
    already holds, or has no staging room for, are left out; none left: no endpoint),
    opened with `transfer_token`, the one-time token the kvstore's receiver issued.
    The transfer must complete within `lease_s` or it is dropped."""

    v: int = PROTOCOL_VERSION
    endpoint: DataPlaneEndpoint | None = None
    transfer_id: str = ""
    transfer_token: bytes = b""
    positions: list[int] = []
    lease_s: float = 0.0
    error: ErrorInfo | None = None


class KVStorePing(msgspec.Struct, kw_only=True):
    """Engine -> kvstore: are you there? (answered with a KVStoreHeartbeat)."""

    v: int = PROTOCOL_VERSION


class KVStoreCounters(msgspec.Struct, kw_only=True):
    """What a kvstore did since it started."""

    lookups: int = 0
    gets: int = 0
    blocks_sent: int = 0
    puts: int = 0
    blocks_stored: int = 0
    failed_transfers: int = 0  # data-plane transfers that broke or outlived their lease
    refused_blocks: int = 0  # put or get blocks left out for lack of staging space


class KVStoreHeartbeat(msgspec.Struct, kw_only=True):
    """A kvstore's registration, every `interval_s` on the registry subject (and the
    answer to a KVStorePing): engines of host `host_id` use it while it beats, and
    treat it as gone after `lease_s` without one."""

    v: int = PROTOCOL_VERSION
    host_id: str
    kvstore_id: str  # this process (two claiming one host_id is a misconfiguration)
    seq: int
    lease_s: float
    started_at: float = 0.0
    tiers: list[str] = []  # "host", and "ssd", "redis" where configured
    host_blocks: int = 0
    host_used_bytes: int = 0
    host_capacity_bytes: int = 0
    counters: KVStoreCounters = msgspec.field(default_factory=KVStoreCounters)


class EncodeRequest(msgspec.Struct, kw_only=True):
    """Engine instance -> vision services, on `vision_encode_subject(namespace)` as a
    NATS request to the queue group (one instance takes it and answers EncodeAccepted at
    once). The taker encodes the images (or finds them in its caches), ships their
    embedding rows to `endpoint` as transfer `transfer_id` (opened with `transfer_token`),
    image i into `blocks[i]` consecutive blocks of the receiver's embedding pool, in
    order, and then publishes EncodeDone to `reply_to`. `namespace`: the embedding
    namespace both sides derive from the weights (a service of other weights refuses)."""

    v: int = PROTOCOL_VERSION
    request_id: str
    namespace: bytes
    images: list[ImageSpec]
    blocks: list[int]
    endpoint: DataPlaneEndpoint
    transfer_id: str
    transfer_token: bytes
    reply_to: str
    deadline: float


class EncodeAccepted(msgspec.Struct, kw_only=True):
    """Vision instance -> engine, the immediate answer to an EncodeRequest: taken (the
    engine watches `instance_id`'s heartbeats from now on), or refused and why."""

    v: int = PROTOCOL_VERSION
    request_id: str
    instance_id: str
    error: ErrorInfo | None = None


class EncodeDone(msgspec.Struct, kw_only=True):
    """Vision instance -> engine, on the request's `reply_to`: the embeddings are in the
    engine's pool (the transfer finished), or why not. `cache_hits`: images found in the
    service's caches (memory or kvstore tiers); `encoded`: images it ran the tower for."""

    v: int = PROTOCOL_VERSION
    request_id: str
    instance_id: str
    cache_hits: int = 0
    encoded: int = 0
    error: ErrorInfo | None = None


class VisionCounters(msgspec.Struct, kw_only=True):
    """A vision instance's counters since it started."""

    requests: int = 0
    images_encoded: int = 0
    memory_hits: int = 0
    tier_hits: int = 0
    misses: int = 0
    batches: int = 0
    encode_seconds: float = 0.0
    bytes_sent: int = 0
    failures: int = 0


class VisionHeartbeat(msgspec.Struct, kw_only=True):
    """A vision instance's registration and lease renewal, every interval on
    `subjects.VISION_HEARTBEAT`. Engines send encode requests only while an instance of
    their namespace beats, and treat a request taken by an instance silent for
    `lease_s` as failed (they encode it themselves)."""

    v: int = PROTOCOL_VERSION
    instance_id: str
    model: str
    namespace: bytes
    seq: int
    lease_s: float
    state: str = "ready"  # "ready" | "draining"
    queued_images: int = 0
    cached_images: int = 0
    counters: VisionCounters = msgspec.field(default_factory=VisionCounters)


Message = (
    GenerateRequest
    | PrefillResult
    | SubmitReply
    | TokenDelta
    | CancelRequest
    | Heartbeat
    | Leave
    | Discover
    | GatewayHeartbeat
    | KVEvents
    | KVSnapshotRequest
    | KVSnapshot
    | KVStoreLookup
    | KVStoreLookupReply
    | KVStoreGet
    | KVStoreGetReply
    | KVStorePut
    | KVStorePutReply
    | KVStorePing
    | KVStoreHeartbeat
    | EncodeRequest
    | EncodeAccepted
    | EncodeDone
    | VisionHeartbeat
)

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}

T = TypeVar("T")


def encode(message: msgspec.Struct, max_payload: int | None = None) -> bytes:
    """Serialize a message for NATS. With `max_payload` (the connection's
    `nc.max_payload`), a message that the server would refuse raises MessageTooLarge,
    naming it, instead of failing the same way on every retry."""
    data = _encoder.encode(message)
    if max_payload is not None and len(data) > max_payload:
        raise MessageTooLarge(type(message).__name__, len(data), max_payload)
    return data


def decode(data: bytes, message_type: type[T]) -> T:
    """Parse a message of a known type; ProtocolError if it is not one or has another version."""
    decoder = _decoders.get(message_type)
    if decoder is None:
        decoder = _decoders[message_type] = msgspec.msgpack.Decoder(message_type)
    try:
        message = decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"not a valid {message_type.__name__}: {exc}") from exc
    version = getattr(message, "v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{message_type.__name__} has protocol version {version}, expected {PROTOCOL_VERSION}"
        )
    return message
