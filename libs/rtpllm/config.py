"""Typed engine configuration, built once at the edge and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Resolve a user dtype ("auto", "bf16", torch.float16, ...) for a device.

    "auto" means bf16 on CUDA and fp32 on CPU: CPU matmuls in bf16 are slow on most
    hosts and the reference tests compare in fp32.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        resolved = _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(set(_DTYPES)))}") from None
    if device == "cpu" and resolved is torch.float16:
        raise ValueError("float16 is not supported on CPU; use float32 or bfloat16")
    return resolved


# --kv-cache-dtype values (rtpllm.kvcache.kv_format resolves them per layer).
KV_CACHE_DTYPES = ("auto", "bf16", "fp8", "int8")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache shape and budget.

    num_blocks=None sizes the pool from memory: `gpu_memory_utilization` of the card on
    CUDA, `cpu_kv_bytes` on CPU.
    """

    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kv_bytes: int = 1 << 30
    enable_prefix_caching: bool = True
    # KV storage format (docs/kv_quantization.md): auto = the model's dtype (the pool as
    # before quantization), bf16, fp8 (e4m3) or int8; fp8/int8 rows carry one fp32 scale
    # per token per KV head. The pool is sized in bytes, so fp8/int8 hold ~2x the blocks.
    kv_cache_dtype: str = "auto"
    # Per-layer formats from a calibration plan (rtpllm.kvcache.kv_plan); wins over
    # kv_cache_dtype. Skipped layers stay in the model's dtype either way.
    kv_cache_plan: str | None = None
    kv_cache_dtype_skip_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


@dataclass(frozen=True)
class OffloadConfig:
    """KV tiers below the GPU (docs/kvstore.md): evicted prefix-cache blocks go to host
    memory (then SSD if reused), blocks found there are restored instead of recomputed
    when the cost model says it is faster. All off by default (host_bytes=0, no kvstore).

    The tiers are the engine's own (host_bytes, ssd_*, redis_*), or with
    `kvstore_host_id` the kvstore service of that host (`rtpllm serve kvstore`), reached
    over NATS at `kvstore_nats_url`, if it answers within `kvstore_wait_s` at startup;
    if it does not, the engine falls back to its own tiers (none if host_bytes=0)."""

    host_bytes: int = 0
    ssd_dir: str | None = None
    ssd_bytes: int = 0
    redis_url: str | None = field(default=None, repr=False)  # shared tier across instances and hosts; may carry the password
    redis_ttl_s: float = 3600.0
    # Offer every newly computed full block at once (needed to share prefixes through
    # Redis or the host's kvstore), not only when evicted. None: on with a Redis tier or
    # the kvstore service.
    write_through: bool | None = None
    # Restore bandwidth per tier (GB/s) and prefill speed (tokens/s) for the cost model:
    # a block is restored only if that is faster than recomputing its tokens. None:
    # prefill speed learned from the engine's own prefill steps.
    host_gb_per_s: float = 8.0
    ssd_gb_per_s: float = 1.0
    redis_gb_per_s: float = 0.4
    prefill_tokens_per_s: float | None = None
    kvstore_host_id: str | None = None
    # A whole NATS connection in one string: credentials in the userinfo, TLS files in
    # the query (rtpllm.serving.bus.NatsConfig.as_url); so never in a repr.
    kvstore_nats_url: str = field(default="nats://127.0.0.1:4222", repr=False)
    # Where this engine's data plane listens for the blocks the kvstore sends it (a
    # wildcard announces this host's address: containers, several hosts).
    kv_host: str = "127.0.0.1"
    kvstore_wait_s: float = 5.0  # at startup, for the kvstore's first answer
    kvstore_timeout_s: float = 2.0  # per NATS request to the kvstore (each data-plane wait: 5 s)
    # Tier lookups and restores on background threads while the request waits in the
    # scheduler (ARCHITECTURE rule 8: the step loop never waits on the network). None:
    # when a tier is on the network (Redis, the kvstore service); host memory and SSD
    # alone answer on the engine thread, as before.
    background_tiers: bool | None = None
    # How long a request waits for its tier lookup, and then for its restore, before it
    # is computed instead: the predicted prefill time of the blocks at stake (waiting
    # longer cannot pay), at least tier_wait_min_s (thread hand-offs, scheduling noise),
    # at most tier_wait_max_s. That is also the wait while the prefill speed is not known
    # yet (a fresh engine), whose first restore opens its data-plane connection too
    # (~0.1 s on the 2-core VM, more under load).
    tier_wait_min_s: float = 0.02
    tier_wait_max_s: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.host_bytes > 0 or bool(self.kvstore_host_id)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits for one engine step."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")


SPECULATIVE_METHODS = ("ngram", "suffix", "draft", "eagle")
# Methods that load a model from `SpeculativeConfig.draft_model`.
MODEL_METHODS = ("draft", "eagle")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (docs/speculative_decoding.md); off unless `method` is set.

    `num_speculative_tokens`: the most draft tokens a request verifies per step. With
    `adaptive` (the default) each step takes fewer, down to none, from each request's
    measured acceptance and the measured cost of extra tokens in a step; without it
    every proposal is verified up to that length.

    Method "draft": `draft_model` (a model directory or known name whose vocabulary is
    the target's) proposes the drafts, with its own KV pool taking `draft_kv_share` of
    the KV memory (None: the share that holds as many tokens as the target's pool).
    Method "eagle": `draft_model` is an EAGLE or EAGLE-3 head's directory, trained for
    the target; its KV pool is split off the same way."""

    method: str | None = None  # "ngram" | "suffix" | "draft" | "eagle"
    num_speculative_tokens: int = 4
    adaptive: bool = True
    ngram_min: int = 2
    ngram_max: int = 4
    draft_model: str | None = None
    draft_kv_share: float | None = None

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError(f"num_speculative_tokens must be in [1, 32], got {self.num_speculative_tokens}")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative method 'draft' needs draft_model, the draft model's directory or name (draft:PATH)")
        if self.method == "eagle" and not self.draft_model:
            raise ValueError("speculative method 'eagle' needs draft_model, the EAGLE head's directory (eagle:PATH)")
        if self.method not in MODEL_METHODS and self.draft_model is not None:
            raise ValueError(f"draft_model is for speculative methods 'draft' and 'eagle', not {self.method!r}")
        if self.draft_kv_share is not None and not 0.0 < self.draft_kv_share < 1.0:
            raise ValueError(f"draft_kv_share must be in (0, 1), got {self.draft_kv_share}")

    @property
    def enabled(self) -> bool:
        return self.method is not None


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs to start: model location, placement, cache and batching."""

    model: str = "smollm2-135m-instruct"
    device: str = "cpu"
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"
    # "auto": read the checkpoint's safetensors; "dummy": random weights drawn on the
    # device (benchmarks of full-size shapes without writing a checkpoint).
    load_format: str = "auto"
    # Capture the decode step in CUDA graphs (CUDA with a graph-safe attention backend).
    cuda_graphs: bool = True
    # With cuda_graphs, also replay steps with prefill tokens (up to the step's token
    # budget) from graphs captured in pieces, attention eager between them
    # (engine/piecewise_graphs.py). None: on, except with tensor parallelism (whose GPU
    # tests have not yet run with them: they need two GPUs).
    mixed_cuda_graphs: bool | None = None
    # Launch step n+1 before reading step n's tokens back (None: on for CUDA, off for CPU,
    # where nothing runs asynchronously and the extra step of a finished request is waste).
    async_scheduling: bool | None = None
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    offload: OffloadConfig = OffloadConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()
    # Name that clients use for this model; defaults to the model path's last component.
    served_model_name: str | None = None
    # Ranks the model is split over, one process and device each (docs/tensor_parallel.md);
    # this process is rank 0 and starts the others.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.speculative.method == "eagle" and self.tensor_parallel_size > 1:
            raise ValueError("speculative EAGLE heads are not supported with tensor parallelism (tensor_parallel_size > 1)")
