"""Every NATS subject rtpllm uses, in one place.

Subjects are `rtpllm.v<PROTOCOL_VERSION>.<area>...`: a process speaking another protocol
version never receives a message it cannot decode, and two versions can share one NATS
server during a rolling upgrade.

    rtpllm.v1.<role>.<instance>.generate   gateway -> engine instance: GenerateRequest (NATS request; SubmitReply back)
    rtpllm.v1.<role>.<instance>.cancel     gateway -> engine instance: CancelRequest
    rtpllm.v1.gateway.<gateway>.deltas     engine -> the gateway that asked: TokenDelta
    rtpllm.v1.registry.heartbeat           engine -> all gateways: Heartbeat (registration + lease renewal)
    rtpllm.v1.registry.leave               engine -> all gateways: Leave (clean shutdown)
    rtpllm.v1.registry.discover            gateway -> all engines: Discover (answer with a Heartbeat now)
    rtpllm.v1.gateway.heartbeat            gateway -> all engines: GatewayHeartbeat (its lease on running requests)
    rtpllm.v1.kv.<instance>.events         engine -> routers/kvstore: KVEvents
    rtpllm.v1.decode.<instance>.prefilled  prefill -> decode instance: PrefillResult
    rtpllm.v1.kv.<instance>.snapshot       router -> engine instance: KVSnapshotRequest (KVSnapshot back)
    rtpllm.v1.kvstore.<host>.lookup        engine -> its host's kvstore: KVStoreLookup (KVStoreLookupReply back)
    rtpllm.v1.kvstore.<host>.get           engine -> kvstore: KVStoreGet (KVStoreGetReply back; KV over the data plane)
    rtpllm.v1.kvstore.<host>.put           engine -> kvstore: KVStorePut (KVStorePutReply back; KV over the data plane)
    rtpllm.v1.kvstore.<host>.ping          engine -> kvstore: KVStorePing (KVStoreHeartbeat back)
    rtpllm.v1.registry.kvstore             kvstore -> engines, gateways: KVStoreHeartbeat
    rtpllm.v1.vision.<namespace>.encode    engine -> vision services (queue group "vision"): EncodeRequest (EncodeAccepted back)
    rtpllm.v1.encoded.<instance>           vision service -> engine instance: EncodeDone
    rtpllm.v1.registry.vision              vision service -> engines, gateways: VisionHeartbeat

`<role>` is an InstanceRole: "worker" (aggregated), "decode" (both take requests from
gateways) or "prefill" (takes hand-offs from decode instances).
"""

from __future__ import annotations

import re
import socket
from enum import StrEnum

PROTOCOL_VERSION = 1
PREFIX = f"rtpllm.v{PROTOCOL_VERSION}"

# NATS tokens are separated by "." and "*"/">" are wildcards; ids must avoid all three
# (and whitespace) so one id is exactly one subject token.
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class InstanceRole(StrEnum):
    """What an engine instance does; part of its subjects and its heartbeat."""

    WORKER = "worker"  # prefill + decode in one engine (aggregated)
    PREFILL = "prefill"
    DECODE = "decode"


def check_id(value: str, what: str = "id") -> str:
    """Return `value` if it is usable as one subject token, else raise ValueError."""
    if not _ID_RE.match(value):
        raise ValueError(f"{what} {value!r} must be 1-128 characters of A-Z a-z 0-9 _ -")
    return value


def generate_subject(instance_id: str, role: InstanceRole | str = InstanceRole.WORKER) -> str:
    return f"{PREFIX}.{InstanceRole(role).value}.{instance_id}.generate"


def cancel_subject(instance_id: str, role: InstanceRole | str = InstanceRole.WORKER) -> str:
    return f"{PREFIX}.{InstanceRole(role).value}.{instance_id}.cancel"


def status_subject(instance_id: str, role: InstanceRole | str = InstanceRole.WORKER) -> str:
    """Gateway -> instance request/reply: which of these requests do you still run?"""
    return f"{PREFIX}.{InstanceRole(role).value}.{instance_id}.status"


def deltas_subject(gateway_id: str) -> str:
    return f"{PREFIX}.gateway.{gateway_id}.deltas"


def prefilled_subject(decode_instance_id: str) -> str:
    return f"{PREFIX}.decode.{decode_instance_id}.prefilled"


def kv_snapshot_subject(instance_id: str) -> str:
    return f"{PREFIX}.kv.{instance_id}.snapshot"


def kv_events_subject(instance_id: str) -> str:
    return f"{PREFIX}.kv.{instance_id}.events"


class KVStoreOp(StrEnum):
    """The requests a kvstore answers, one subject each."""

    LOOKUP = "lookup"
    GET = "get"
    PUT = "put"
    PING = "ping"


def kvstore_subject(host_id: str, op: KVStoreOp | str) -> str:
    """Where the kvstore of host `host_id` answers `op` (NATS request/reply)."""
    return f"{PREFIX}.kvstore.{host_id}.{KVStoreOp(op).value}"


def subject_token(value: str, fallback: str = "host") -> str:
    """`value` made usable as one subject token (a hostname's dots become dashes)."""
    token = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_" else "-" for ch in value)[:128]
    return token or fallback


def kvstore_events_id(host_id: str) -> str:
    """The id a host's kvstore publishes KV events (of its host tier) and answers KV
    snapshots under, in place of an instance id."""
    return f"{KVSTORE_EVENTS_PREFIX}{host_id}"


def is_kvstore_events_id(instance_id: str) -> bool:
    """Whether KV events or a snapshot under this id come from a host's kvstore."""
    return instance_id.startswith(KVSTORE_EVENTS_PREFIX)


def default_host_id() -> str:
    """This machine's kvstore host id unless told otherwise: its hostname as a token."""
    return subject_token(socket.gethostname())


def vision_encode_subject(namespace: bytes) -> str:
    """Where the vision services of an embedding namespace take encode requests (as the
    queue group VISION_QUEUE): one subject per set of weights, so services of another
    model never see them."""
    return f"{PREFIX}.vision.{namespace.hex()[:32]}.encode"


def encoded_subject(instance_id: str) -> str:
    """Where an engine instance hears that its encode requests are done."""
    return f"{PREFIX}.encoded.{instance_id}"


VISION_QUEUE = "vision"
VISION_HEARTBEAT = f"{PREFIX}.registry.vision"
HEARTBEAT = f"{PREFIX}.registry.heartbeat"
LEAVE = f"{PREFIX}.registry.leave"
DISCOVER = f"{PREFIX}.registry.discover"
GATEWAY_HEARTBEAT = f"{PREFIX}.gateway.heartbeat"
KVSTORE_HEARTBEAT = f"{PREFIX}.registry.kvstore"
KVSTORE_EVENTS_PREFIX = "kvstore-"  # kvstore_events_id(host) = KVSTORE_EVENTS_PREFIX + host
KV_EVENTS_ALL = f"{PREFIX}.kv.*.events"
