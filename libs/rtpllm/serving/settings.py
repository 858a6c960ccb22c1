"""Typed settings of the gateway and worker services, built once by the command line
(the only place that reads `RTPLLM_*` environment variables) and passed down."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rtpllm.serving.bus import NatsConfig

if TYPE_CHECKING:
    # Only workers build one; the gateway's settings must not import torch with it.
    from rtpllm.config import EngineConfig


@dataclass(frozen=True)
class GatewaySettings:
    """Everything `rtpllm serve gateway` needs; see docs/serving.md for each field."""

    nats: NatsConfig = NatsConfig()
    redis_url: str | None = field(default=None, repr=False)  # may carry the password
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "smollm2-135m-instruct"
    served_model_name: str | None = None
    gateway_id: str = ""
    router: str = "cache-aware"
    router_queue_tokens: int = 128
    router_host_credit: float = 0.5
    max_running: int = 1024
    max_queue: int = 1024
    request_timeout_s: float = 600.0
    submit_timeout_s: float = 5.0
    heartbeat_interval_s: float = 1.0
    lease_s: float = 3.0
    retry_after_s: int = 1
    shutdown_timeout_s: float = 10.0
    nats_connect_timeout_s: float = 30.0
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    max_predicted_ttft_s: float = 0.0  # early 429 for requests predicted to start later (0: deadline only)
    # With keys, every path but /health and /ready needs `Authorization: Bearer <key>`
    # (/metrics and /instances only with protect_metrics); none: the API is open.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    protect_metrics: bool = True
    # Images of chat requests (rtpllm.api.images.MediaSettings; docs/serving.md#images).
    allowed_media_domains: tuple[str, ...] = ()  # http(s) image hosts; none: no fetching
    allowed_media_networks: tuple[str, ...] = ()  # CIDRs exempt from the SSRF address ban
    allowed_local_media_path: str | None = None  # the directory file: URLs may read
    max_images_per_request: int = 8
    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 20 << 20  # capped at the NATS server's max_payload
    media_fetch_timeout_s: float = 10.0
    # Logging: a line per request (rtpllm.api.access_log), and a stats line every this
    # many seconds while there is traffic (rtpllm.serving.stats_log; 0: none).
    access_log: bool = True
    stats_interval_s: float = 10.0
    # The format of the model's tool calls (rtpllm.tools): a parser name, or "auto".
    tool_call_parser: str = "auto"


@dataclass(frozen=True)
class WorkerSettings:
    """Everything `rtpllm serve worker` needs; see docs/serving.md for each field."""

    engine: EngineConfig
    nats: NatsConfig = NatsConfig()
    redis_url: str | None = field(default=None, repr=False)  # may carry the password
    instance_id: str = ""
    heartbeat_interval_s: float = 1.0
    lease_s: float = 3.0
    drain_timeout_s: float = 10.0
    nats_connect_timeout_s: float = 30.0
    # Disaggregation (docs/disaggregation.md): "worker" prefills and decodes; "prefill"
    # and "decode" split the two, moving KV over the data plane.
    role: str = "worker"
    local_prefill_below: int = 512
    kv_host: str = "127.0.0.1"  # decode: where the data plane listens (reachable by prefill instances)
    kv_port: int = 0
    kv_backends: tuple[str, ...] = ("cuda_ipc", "shm", "tcp")
    kv_lease_s: float = 30.0
    health_file: str | None = None  # touched while serving (rtpllm.serving.health)
    # Vision-language models (docs/multimodal.md): the pool vision services ship image
    # embeddings into (0: none, encode here), and the image tokens below which a
    # request's images are encoded here anyway.
    embedding_pool_bytes: int = 256 << 20
    local_encode_below: int = 0


@dataclass(frozen=True)
class VisionSettings:
    """Everything `rtpllm serve vision` needs; see docs/multimodal.md for each field."""

    model: str
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 0
    load_format: str = "auto"
    served_model_name: str | None = None
    nats: NatsConfig = NatsConfig()
    instance_id: str = ""
    heartbeat_interval_s: float = 1.0
    lease_s: float = 3.0
    cache_bytes: int = 1 << 30
    max_batch_images: int = 16
    batch_wait_s: float = 0.002
    kvstore_host_id: str | None = None  # None: no kvstore tiers
    kvstore_nats_url: str = "nats://127.0.0.1:4222"
    kv_host: str = "127.0.0.1"
    kv_backends: tuple[str, ...] = ("cuda_ipc", "shm", "tcp")
    nats_connect_timeout_s: float = 30.0
    health_file: str | None = None
    gpu_claim_dir: str | None = None  # device "cuda": claim a free GPU of the host (rtpllm.runtime.gpu_claim)


@dataclass(frozen=True)
class KVStoreSettings:
    """Everything `rtpllm serve kvstore` needs; see docs/kvstore.md for each field."""

    host_id: str
    nats: NatsConfig = NatsConfig()
    host_bytes: int = 4 << 30
    ssd_dir: str | None = None
    ssd_bytes: int = 16 << 30
    redis_url: str | None = field(default=None, repr=False)  # the shared Redis tier (None: none); may carry the password
    redis_ttl_s: float = 3600.0
    kv_host: str = "127.0.0.1"
    kv_port: int = 0
    staging_bytes: int = 256 << 20
    transfer_lease_s: float = 10.0
    heartbeat_interval_s: float = 1.0
    lease_s: float = 3.0
    nats_connect_timeout_s: float = 30.0
    health_file: str | None = None  # touched while serving (rtpllm.serving.health)


def new_id(kind: str) -> str:
    """A process-unique id usable as a NATS subject token: kind-host-random."""
    host = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in socket.gethostname())[:32] or "host"
    return f"{kind}-{host}-{uuid.uuid4().hex[:8]}"
