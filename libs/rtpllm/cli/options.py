"""Every service flag, grouped as the commands use them (the configuration reference)."""

from __future__ import annotations

from dataclasses import replace

from rtpllm.cli.flags import Flag
from rtpllm.routing.policy import POLICIES
from rtpllm.tools.registry import PARSER_NAMES

DEFAULT_MODEL = "smollm2-135m-instruct"

BUS = [
    Flag("--nats", "RTPLLM_NATS_URL", "NATS server URL", "nats://127.0.0.1:4222"),
    Flag("--redis", "RTPLLM_REDIS_URL", "Redis URL (checked at startup and reported by /ready; the shared KV tier with --kv-redis); a password may be in it: redis://:PASSWORD@host:port/0"),
    # Credentials: prefer the variables or the *-file flags, since any user of the host can read a command line.
    Flag("--nats-token", "RTPLLM_NATS_TOKEN", "NATS auth token (also as nats://TOKEN@host:port)"),
    Flag("--nats-token-file", "RTPLLM_NATS_TOKEN_FILE", "file holding the NATS auth token"),
    Flag("--nats-user", "RTPLLM_NATS_USER", "NATS user, with --nats-password (also as nats://USER:PASSWORD@host:port)"),
    Flag("--nats-password", "RTPLLM_NATS_PASSWORD", "NATS password of --nats-user"),
    Flag("--nats-tls-ca", "RTPLLM_NATS_TLS_CA", "CA file that signed the NATS server's certificate (any --nats-tls-* makes the connection TLS-only; a tls:// URL with the system's CAs does too)"),
    Flag("--nats-tls-cert", "RTPLLM_NATS_TLS_CERT", "client certificate for NATS mutual TLS, with --nats-tls-key"),
    Flag("--nats-tls-key", "RTPLLM_NATS_TLS_KEY", "private key of --nats-tls-cert"),
    Flag("--redis-password", "RTPLLM_REDIS_PASSWORD", "Redis password (put into the --redis URL)"),
    Flag("--redis-password-file", "RTPLLM_REDIS_PASSWORD_FILE", "file holding the Redis password"),
    Flag("--nats-connect-timeout", "RTPLLM_NATS_CONNECT_TIMEOUT", "seconds to keep retrying the first NATS connection", 30.0, float),
    Flag("--log-level", "RTPLLM_LOG_LEVEL", "log level", "info", str, ["debug", "info", "warning", "error"]),
]

MODEL = [
    Flag("--model", "RTPLLM_MODEL", "model: a known name or an HF-format directory", DEFAULT_MODEL),
    Flag("--served-model-name", "RTPLLM_SERVED_MODEL_NAME", "name clients use for the model (default: the model name, or the directory's name)"),
]

# The KV tiers below the pool: an engine's own, or its host's kvstore's (KVSTORE).
KV_TIERS = [
    Flag("--kv-host-gib", "RTPLLM_KV_HOST_GIB", "host-memory KV tier per engine, GiB (0: no tiers below the KV pool)", 0.0, float),
    Flag("--kv-ssd-dir", "RTPLLM_KV_SSD_DIR", "directory of the SSD KV tier (blocks reused or pinned after leaving host memory)"),
    Flag("--kv-ssd-gib", "RTPLLM_KV_SSD_GIB", "SSD KV tier capacity, GiB", 16.0, float),
    Flag("--kv-redis", "RTPLLM_KV_REDIS", "use the --redis server as a KV tier shared by all instances (needs --kv-host-gib > 0)", False, boolean=True),
    Flag("--kv-redis-ttl", "RTPLLM_KV_REDIS_TTL", "seconds a KV block lives in Redis", 3600.0, float),
]

ENGINE = [
    Flag("--device", "RTPLLM_DEVICE", "device: auto (cuda if present, else cpu), cpu, cuda, cuda:N", "auto"),
    Flag("--dtype", "RTPLLM_DTYPE", "weights/KV dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32", "auto"),
    Flag("--max-model-len", "RTPLLM_MAX_MODEL_LEN", "context length (default: the model's, capped by the KV pool)", None, int),
    Flag("--block-size", "RTPLLM_BLOCK_SIZE", "tokens per KV block (a power of two)", 16, int),
    Flag("--num-blocks", "RTPLLM_NUM_BLOCKS", "KV blocks (default: sized from memory)", None, int),
    Flag("--gpu-memory-utilization", "RTPLLM_GPU_MEMORY_UTILIZATION", "fraction of GPU memory for weights + KV", 0.85, float),
    Flag("--cpu-kv-gib", "RTPLLM_CPU_KV_GIB", "KV pool size on CPU, GiB", 1.0, float),
    Flag("--prefix-caching", "RTPLLM_PREFIX_CACHING", "reuse cached KV of shared prompt prefixes", True, boolean=True),
    # Choices spelled here, not imported from rtpllm.config: the gateway imports this module without torch.
    Flag("--kv-cache-dtype", "RTPLLM_KV_CACHE_DTYPE", "KV cache format: auto (the model's dtype), bf16, fp8 (e4m3) or int8; fp8/int8 keep one scale per token per KV head and hold ~2x the tokens (docs/kv_quantization.md)", "auto", str, ["auto", "bf16", "fp8", "int8"]),
    Flag("--kv-cache-plan", "RTPLLM_KV_CACHE_PLAN", "per-layer KV formats from `python -m rtpllm.engine.kv_calibrate` (a JSON plan; wins over --kv-cache-dtype)"),
    Flag("--kv-cache-dtype-skip-layers", "RTPLLM_KV_CACHE_DTYPE_SKIP_LAYERS", "comma-separated layer indices whose KV stays in the model's dtype"),
    Flag("--max-num-seqs", "RTPLLM_MAX_NUM_SEQS", "sequences per engine step", 256, int),
    Flag("--max-num-batched-tokens", "RTPLLM_MAX_NUM_BATCHED_TOKENS", "tokens per engine step (prefill chunk budget)", 2048, int),
    Flag("--seed", "RTPLLM_SEED", "engine seed for requests without their own", 0, int),
    Flag("--attention-backend", "RTPLLM_ATTENTION_BACKEND", "attention backend (auto picks per device)", "auto"),
    Flag("--load-format", "RTPLLM_LOAD_FORMAT", "weights: auto (the checkpoint's safetensors) or dummy (random, for benchmarks)", "auto", str, ["auto", "dummy"]),
    Flag("--cuda-graphs", "RTPLLM_CUDA_GRAPHS", "capture the decode step in CUDA graphs (CUDA only)", True, boolean=True),
    Flag("--mixed-cuda-graphs", "RTPLLM_MIXED_CUDA_GRAPHS", "with --cuda-graphs: also replay steps with prefill tokens (up to --max-num-batched-tokens) from graphs captured in pieces, attention run eagerly between them (default: on, except with --tensor-parallel-size > 1)", None, boolean=True),
    Flag("--tensor-parallel-size", "RTPLLM_TENSOR_PARALLEL_SIZE", "split the model over N processes and devices (this process is rank 0 and starts the others; CUDA: devices --device..+N-1); one instance on the bus (docs/tensor_parallel.md)", 1, int, aliases=("-tp",)),
    Flag("--async-scheduling", "RTPLLM_ASYNC_SCHEDULING", "launch step n+1 before step n's tokens are read back: auto (on for CUDA), on, off", "auto", str, ["auto", "on", "off"]),
    # No argparse choices: draft:PATH and eagle:PATH carry a path (checked in serve.py, naming the flag).
    Flag("--speculative", "RTPLLM_SPECULATIVE", "speculative decoding: off, ngram (prompt lookup), suffix (suffix decoding), draft:PATH (a smaller model with the target's vocabulary: a model directory or known name) or eagle:PATH (an EAGLE or EAGLE-3 head trained for the target: a local checkpoint directory); outputs are unchanged, only speed (docs/speculative_decoding.md)", "off"),
    Flag("--num-speculative-tokens", "RTPLLM_NUM_SPECULATIVE_TOKENS", "with --speculative: the most draft tokens a request verifies per step (1-32)", 4, int),
    Flag("--speculative-draft-kv-share", "RTPLLM_SPECULATIVE_DRAFT_KV_SHARE", "with --speculative draft:PATH or eagle:PATH: fraction of the KV memory for the draft model's (or head's) own KV pool, in (0, 1) (default: the share that holds as many tokens as the target's pool)", None, float),
    Flag("--speculative-adaptive", "RTPLLM_SPECULATIVE_ADAPTIVE", "with --speculative: choose fewer draft tokens per step, down to none, from each request's acceptance and the measured cost of a step's tokens (--no-speculative-adaptive: always up to --num-speculative-tokens)", True, boolean=True),
    *KV_TIERS,
    Flag("--kv-write-through", "RTPLLM_KV_WRITE_THROUGH", "store every newly computed full KV block at once, not only when evicted from the pool: auto (on with --kv-redis or a kvstore), on, off", "auto", str, ["auto", "on", "off"]),
    Flag("--kvstore", "RTPLLM_KVSTORE", "use this host's kvstore service (`rtpllm serve kvstore`) as the KV tiers when it answers at startup, else this engine's own --kv-* tiers; `up`: also start one kvstore, which gets the --kv-* tier flags", False, boolean=True),
    Flag("--kvstore-host-id", "RTPLLM_KVSTORE_HOST_ID", "host id of the kvstore to use (default: this host's name, the kvstore's own default)"),
    Flag("--kv-tier-wait-min", "RTPLLM_KV_TIER_WAIT_MIN", "seconds a request may always wait for a Redis/kvstore tier lookup or restore, even when recomputing is predicted to be faster", 0.02, float),
    Flag("--kv-tier-wait-max", "RTPLLM_KV_TIER_WAIT_MAX", "seconds a request may wait for a Redis/kvstore tier lookup or restore before it is computed as a miss (others run on meanwhile; below this the wait is the predicted prefill time saved)", 1.0, float),
    Flag("--kv-host", "RTPLLM_KV_HOST", "address this engine's KV data plane listens on (decode: KV from prefill instances; every engine: blocks from the kvstore); 0.0.0.0 listens everywhere and announces this host's IP (containers)", "127.0.0.1"),
    Flag("--gpu-claim-dir", "RTPLLM_GPU_CLAIM_DIR", "with --device cuda (no index): claim the first GPU no other process holds, by a lock file in DIR shared by every engine of the host (scaled containers each get their own GPU)"),
    Flag("--health-file", "RTPLLM_HEALTH_FILE", "touch FILE on every heartbeat once serving (container healthchecks: `rtpllm health FILE`)"),
]

WORKER = [
    Flag("--instance-id", "RTPLLM_INSTANCE_ID", "this worker's id on the bus (default: worker-<host>-<random>)"),
    Flag("--heartbeat-interval", "RTPLLM_HEARTBEAT_INTERVAL", "seconds between heartbeats", 1.0, float),
    Flag("--lease", "RTPLLM_LEASE", "seconds without a heartbeat after which gateways drop this process and fail its streams", 3.0, float),
    Flag("--drain-timeout", "RTPLLM_DRAIN_TIMEOUT", "on SIGTERM, seconds running requests may finish before they are failed", 10.0, float),
    Flag("--embedding-pool-mib", "RTPLLM_EMBEDDING_POOL_MIB", "vision-language models: MiB of the pool that receives image embeddings from vision services (0: never use a vision service; encode every image here)", 256.0, float),
    Flag("--local-encode-below", "RTPLLM_LOCAL_ENCODE_BELOW", "vision-language models: requests with fewer image tokens are encoded here, not by a vision service (0: use a vision service whenever one is alive)", 0, int),
]

DISAGG = [
    Flag("--local-prefill-below", "RTPLLM_LOCAL_PREFILL_BELOW", "decode: prompts with fewer uncached tokens are prefilled locally (0: always use a prefill instance when one is alive)", 512, int),
    Flag("--kv-port", "RTPLLM_KV_PORT", "decode: KV data plane port (0: a free one)", 0, int),
    Flag("--kv-backends", "RTPLLM_KV_BACKENDS", "data-plane backends, in order of preference, where both sides allow them", "cuda_ipc,shm,tcp"),
    Flag("--kv-lease", "RTPLLM_KV_LEASE", "seconds a remote prefill and its KV transfer may take before the decode instance gives up on it", 30.0, float),
]

# `serve vision`: the model flags of an engine that matter to a vision tower, and its own.
VISION = [
    *(f for f in ENGINE if f.name in ("--device", "--dtype", "--seed", "--load-format", "--gpu-claim-dir", "--health-file")),
    Flag("--instance-id", "RTPLLM_INSTANCE_ID", "this vision instance's id on the bus (default: vision-<host>-<random>)"),
    Flag("--heartbeat-interval", "RTPLLM_HEARTBEAT_INTERVAL", "seconds between heartbeats", 1.0, float),
    Flag("--lease", "RTPLLM_LEASE", "seconds without a heartbeat after which engines treat this instance as gone (and encode its requests' images themselves)", 3.0, float),
    Flag("--cache-gib", "RTPLLM_VISION_CACHE_GIB", "GiB of image embeddings kept in memory by content hash (the pool the data plane ships from)", 1.0, float),
    Flag("--max-batch-images", "RTPLLM_MAX_BATCH_IMAGES", "images per tower call at most (images of concurrent requests share a call)", 16, int),
    Flag("--batch-wait-ms", "RTPLLM_BATCH_WAIT_MS", "milliseconds a batch with room waits for more images before the tower runs", 2.0, float),
    Flag("--kvstore", "RTPLLM_KVSTORE", "also keep embeddings in this host's kvstore tiers (host memory, SSD, Redis) when it answers at startup", False, boolean=True),
    Flag("--kvstore-host-id", "RTPLLM_KVSTORE_HOST_ID", "host id of the kvstore to use (default: this host's name)"),
    Flag("--kv-host", "RTPLLM_KV_HOST", "address this service's data plane listens on for blocks from the kvstore; 0.0.0.0 announces this host's IP (containers)", "127.0.0.1"),
    Flag("--kv-backends", "RTPLLM_KV_BACKENDS", "data-plane backends, in order of preference, where both sides allow them", "cuda_ipc,shm,tcp"),
]

# The gateway's API keys; `up` passes them on (or makes one).
API_KEYS = [
    Flag("--api-key", "RTPLLM_API_KEY", "API key clients must send as `Authorization: Bearer KEY`; several comma-separated (no key at all: the API is open)"),
    Flag("--api-key-file", "RTPLLM_API_KEY_FILE", "file of API keys, one per line (blank lines and # comments ignored)"),
    Flag("--protect-metrics", "RTPLLM_PROTECT_METRICS", "with API keys, /metrics and /instances need a key too (/health and /ready never do)", True, boolean=True),
]

# Images in chat requests (vision-language models); docs/serving.md#images.
IMAGES = [
    Flag("--allowed-media-domains", "RTPLLM_ALLOWED_MEDIA_DOMAINS", "comma-separated hosts whose http(s) image URLs the gateway fetches (*.example.com: its subdomains); none: only data: (and --allowed-local-media-path file:) URLs"),
    Flag("--allowed-media-networks", "RTPLLM_ALLOWED_MEDIA_NETWORKS", "comma-separated CIDRs image fetches may reach although loopback, private or link-local (an internal image store); none: only public addresses"),
    Flag("--allowed-local-media-path", "RTPLLM_ALLOWED_LOCAL_MEDIA_PATH", "directory whose files file: image URLs may name (symlinks resolved); none: file: URLs refused"),
    Flag("--max-images-per-request", "RTPLLM_MAX_IMAGES_PER_REQUEST", "images one chat request may carry", 8, int),
    Flag("--max-image-pixels", "RTPLLM_MAX_IMAGE_PIXELS", "largest width x height of an image, checked from its header before decoding", 50_000_000, int),
    Flag("--max-image-bytes", "RTPLLM_MAX_IMAGE_BYTES", "largest encoded image, bytes (capped at the NATS server's max_payload, which a request's images must fit together)", 20 << 20, int),
    Flag("--media-fetch-timeout", "RTPLLM_MEDIA_FETCH_TIMEOUT", "seconds to fetch and decode all of a request's images (and each fetch, redirects included)", 10.0, float),
]

# The gateway's log lines; `up` passes them on.
GATEWAY_LOGS = [
    Flag("--access-log", "RTPLLM_ACCESS_LOG", "log one line per HTTP request: method, path, status, response id, prompt and completion tokens, TTFT, latency (probes: /health, /ready, /metrics, /instances at debug level)", True, boolean=True),
    Flag("--stats-interval", "RTPLLM_STATS_INTERVAL", "seconds between stats lines (prompt and generation tok/s, running/waiting at the gateway and per instance, KV usage), logged while there is traffic (0: none)", 10.0, float),
]

# How the gateway reads the model's tool calls; `up` passes it on.
TOOLS = [
    Flag("--tool-call-parser", "RTPLLM_TOOL_CALL_PARSER", "format of the model's tool calls: hermes (<tool_call> JSON: Qwen2/2.5/3, Hermes), llama3_json (Llama 3.1+ JSON), mistral ([TOOL_CALLS]), or auto (from the chat template; hermes when it shows none)", "auto", str, list(PARSER_NAMES)),
]

GATEWAY = [
    Flag("--host", "RTPLLM_HOST", "HTTP bind address", "127.0.0.1"),
    Flag("--port", "RTPLLM_PORT", "HTTP port", 8000, int),
    Flag("--gateway-id", "RTPLLM_GATEWAY_ID", "this gateway's id on the bus (default: gateway-<host>-<random>)"),
    Flag("--router", "RTPLLM_ROUTER", "routing policy", "cache-aware", str, sorted(POLICIES)),
    Flag("--router-queue-tokens", "RTPLLM_ROUTER_QUEUE_TOKENS", "cache-aware routing: prompt tokens one pending request counts as", 128, int),
    Flag("--router-host-credit", "RTPLLM_ROUTER_HOST_CREDIT", "cache-aware routing: share of a prompt token's prefill saved when its KV is in an instance's host-memory tier", 0.5, float),
    Flag("--max-running", "RTPLLM_MAX_RUNNING", "sequences (prompts x n) this gateway runs at once", 1024, int),
    Flag("--max-queue", "RTPLLM_MAX_QUEUE", "sequences waiting for a slot before new requests get 429", 1024, int),
    Flag("--max-predicted-ttft", "RTPLLM_MAX_PREDICTED_TTFT", "refuse (429 with Retry-After) a request no instance is predicted to start within this many seconds, from each instance's learned prefill rate and the prompt tokens queued on it (0: only the request's deadline counts)", 0.0, float),
    Flag("--max-body-bytes", "RTPLLM_MAX_BODY_BYTES", "largest request body accepted, bytes; larger ones get 413 (checked from Content-Length, and as a chunked body is read)", 4194304, int),
    Flag("--request-timeout", "RTPLLM_REQUEST_TIMEOUT", "seconds a request may take end to end before 504", 600.0, float),
    Flag("--submit-timeout", "RTPLLM_SUBMIT_TIMEOUT", "seconds a worker has to accept a request", 5.0, float),
    Flag("--heartbeat-interval", "RTPLLM_HEARTBEAT_INTERVAL", "seconds between heartbeats", 1.0, float),
    Flag("--lease", "RTPLLM_LEASE", "seconds without a gateway heartbeat after which workers abort its requests", 3.0, float),
    Flag("--retry-after", "RTPLLM_RETRY_AFTER", "Retry-After seconds sent with 429 and 503", 1, int),
    Flag("--shutdown-timeout", "RTPLLM_SHUTDOWN_TIMEOUT", "on SIGTERM, seconds open streams may finish", 10.0, float),
    *API_KEYS,
    *IMAGES,
    *TOOLS,
    *GATEWAY_LOGS,
]

UP = [
    Flag("--prefill", "RTPLLM_PREFILL", "prefill instances (the default topology: 1 prefill, 1 decode)", None, int),
    Flag("--decode", "RTPLLM_DECODE", "decode instances, which take the requests (default 1)", None, int),
    Flag("--vision", "RTPLLM_VISION", "vision services (image encoders) to start; default: 1 when the model is vision-language (Qwen2-VL, Idefics3/SmolVLM), else 0", None, int),
    Flag("--workers", "RTPLLM_WORKERS", "instead of prefill + decode: N combined worker processes, each prefilling and decoding its own requests (aggregated; see docs/architecture.md for which to choose)", 0, int),
    Flag("--host", "RTPLLM_HOST", "gateway HTTP bind address", "127.0.0.1"),
    Flag("--port", "RTPLLM_PORT", "gateway HTTP port", 8000, int),
    Flag("--nats-port", "RTPLLM_NATS_PORT", "port of the NATS server started (0: a free one)", 0, int),
    Flag("--redis-port", "RTPLLM_REDIS_PORT", "port of the Redis server started (0: a free one)", 0, int),
    Flag("--redis-server", "RTPLLM_REDIS", "start a Redis server (--no-redis-server to run without)", True, boolean=True),
    Flag("--router", "RTPLLM_ROUTER", "routing policy", "cache-aware", str, sorted(POLICIES)),
    Flag("--max-running", "RTPLLM_MAX_RUNNING", "requests the gateway runs at once", 1024, int),
    Flag("--max-queue", "RTPLLM_MAX_QUEUE", "requests waiting for a slot before new ones get 429", 1024, int),
    Flag("--request-timeout", "RTPLLM_REQUEST_TIMEOUT", "seconds a request may take end to end before 504", 600.0, float),
    Flag("--ready-timeout", "RTPLLM_READY_TIMEOUT", "seconds to wait for the stack to become ready", 600.0, float),
    Flag("--log-dir", "RTPLLM_LOG_DIR", "write each child's log to DIR/<name>.log instead of the terminal"),
    Flag("--log-level", "RTPLLM_LOG_LEVEL", "log level of the services", "info", str, ["debug", "info", "warning", "error"]),
    Flag("--auth", "RTPLLM_AUTH", "authentication: a fresh NATS token and Redis password for this run, and an API key for the gateway: --api-key / --api-key-file, else the key in $RTPLLM_CACHE_DIR/api_key, made there on first use (--no-auth: all open)", True, boolean=True),
    replace(API_KEYS[0], help="the gateway's API key(s), comma-separated (default: the key in $RTPLLM_CACHE_DIR/api_key, made on first use)"),
    *API_KEYS[1:],
    *TOOLS,
    *GATEWAY_LOGS,
]

# `rtpllm up` starts the host's kvstore and points every engine at it unless --no-kvstore.
UP_ENGINE = [
    replace(
        f,
        default=True,
        help="use one kvstore service for the host-memory/SSD/Redis KV tiers, shared by every engine "
        "(--no-kvstore: none; engines then keep their own --kv-* tiers, if any)",
    )
    if f.name == "--kvstore"
    else f
    for f in ENGINE
]

KVSTORE = [
    Flag("--host-id", "RTPLLM_HOST_ID", "this host's name on the bus: engines started with --kvstore on this host use this kvstore (default: the hostname)"),
    replace(KV_TIERS[0], default=4.0, help="host-memory KV tier shared by this host's engines, GiB"),
    *KV_TIERS[1:],
    Flag("--kv-host", "RTPLLM_KV_HOST", "address the kvstore's data plane listens on (the engines of this host connect to it); 0.0.0.0 listens everywhere and announces this host's IP (containers)", "127.0.0.1"),
    Flag("--kv-port", "RTPLLM_KV_PORT", "the kvstore's data-plane port (0: a free one)", 0, int),
    Flag("--kv-staging-mib", "RTPLLM_KV_STAGING_MIB", "host memory per KV layout for blocks in transit between engines and the tiers, MiB", 256.0, float),
    Flag("--kv-transfer-lease", "RTPLLM_KV_TRANSFER_LEASE", "seconds a put or get transfer may take before the kvstore drops it and reuses its staging blocks", 10.0, float),
    Flag("--health-file", "RTPLLM_HEALTH_FILE", "touch FILE on every heartbeat once serving (container healthchecks: `rtpllm health FILE`)"),
]

# `rtpllm secrets DIR`: the compose stack's secrets, made once into a volume.
SECRETS = [
    Flag("--api-key", "RTPLLM_API_KEY", "API key to store instead of a random one (replaces the stored key)"),
]
