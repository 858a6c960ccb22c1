"""`rtpllm serve gateway|worker|prefill|decode|kvstore`: settings from flags, then the
service's entry point."""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtpllm.credentials import read_secret_file, split_userinfo, with_userinfo
from rtpllm.protocol.subjects import check_id, default_host_id
from rtpllm.serving.bus import NatsConfig
from rtpllm.serving.settings import GatewaySettings, KVStoreSettings, VisionSettings, WorkerSettings

if TYPE_CHECKING:
    from rtpllm.config import EngineConfig

GIB = 1 << 30


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _secret(value: str | None, path: str | None, flag: str) -> str | None:
    """A credential given directly, else read from its file flag; None if neither.
    An empty string counts as not given (`rtpllm up` blanks inherited variables so)."""
    if value:
        return value
    if not path:
        return None
    try:
        return read_secret_file(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {flag} {path}: {exc}") from None


def nats_config(args: argparse.Namespace) -> NatsConfig:
    """The NATS connection of the bus flags: URL, credentials, TLS files."""
    try:
        return NatsConfig(
            args.nats,
            token=_secret(args.nats_token, args.nats_token_file, "--nats-token-file"),
            user=args.nats_user or None,
            password=args.nats_password or None,
            tls_ca=args.nats_tls_ca or None,
            tls_cert=args.nats_tls_cert or None,
            tls_key=args.nats_tls_key or None,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def redis_url(args: argparse.Namespace) -> str | None:
    """The --redis URL with the --redis-password(-file) in it, if one is given."""
    url = getattr(args, "redis", None) or None
    password = _secret(getattr(args, "redis_password", None), getattr(args, "redis_password_file", None), "--redis-password-file")
    if url and password:
        _, user, _ = split_userinfo(url)  # an ACL user in the URL stays
        url = with_userinfo(url, user, password)
    return url


def gateway_settings(args: argparse.Namespace) -> GatewaySettings:
    from rtpllm.api.auth import load_api_keys

    try:
        api_keys = load_api_keys(args.api_key, args.api_key_file)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: API keys: {exc}") from None
    return GatewaySettings(
        nats=nats_config(args),
        redis_url=redis_url(args),
        host=args.host,
        port=args.port,
        model=args.model,
        served_model_name=args.served_model_name,
        gateway_id=args.gateway_id or "",
        router=args.router,
        router_queue_tokens=args.router_queue_tokens,
        router_host_credit=args.router_host_credit,
        max_running=args.max_running,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_predicted_ttft_s=args.max_predicted_ttft,
        request_timeout_s=args.request_timeout,
        submit_timeout_s=args.submit_timeout,
        heartbeat_interval_s=args.heartbeat_interval,
        lease_s=args.lease,
        retry_after_s=args.retry_after,
        shutdown_timeout_s=args.shutdown_timeout,
        nats_connect_timeout_s=args.nats_connect_timeout,
        api_keys=api_keys,
        protect_metrics=args.protect_metrics,
        access_log=args.access_log,
        stats_interval_s=args.stats_interval,
        tool_call_parser=args.tool_call_parser,
        **media_settings(args),
    )


def media_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The gateway's image flags as GatewaySettings fields, checked here so a bad value
    stops the gateway at startup rather than failing every image request."""
    networks = _csv(args.allowed_media_networks)
    for net in networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise SystemExit(f"error: --allowed-media-networks: {exc}") from None
    local = args.allowed_local_media_path or None
    if local is not None and not Path(local).expanduser().is_dir():
        raise SystemExit(f"error: --allowed-local-media-path {local!r} is not a directory")
    for name in ("max_images_per_request", "max_image_pixels", "max_image_bytes"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    if args.media_fetch_timeout <= 0:
        raise SystemExit("error: --media-fetch-timeout must be positive")
    return {
        "allowed_media_domains": _csv(args.allowed_media_domains),
        "allowed_media_networks": networks,
        "allowed_local_media_path": str(Path(local).expanduser()) if local is not None else None,
        "max_images_per_request": args.max_images_per_request,
        "max_image_pixels": args.max_image_pixels,
        "max_image_bytes": args.max_image_bytes,
        "media_fetch_timeout_s": args.media_fetch_timeout,
    }


def _speculative_config(args: argparse.Namespace, config: type) -> Any:
    """--speculative and its flags as a SpeculativeConfig (SystemExit naming the flag)."""
    raw = (getattr(args, "speculative", None) or "off").strip()
    method: str | None = raw
    draft = None
    what = {"draft": "the draft model's directory or name", "eagle": "the EAGLE head's directory"}
    prefix = raw.split(":", 1)[0]
    if ":" in raw and prefix in what:
        method, draft = prefix, raw.split(":", 1)[1].strip()
        if not draft:
            raise SystemExit(f"error: --speculative {prefix}:PATH: PATH ({what[prefix]}) is empty")
    elif raw == "off":
        method = None
    elif raw not in ("ngram", "suffix"):
        hint = f" (a {'draft model' if raw == 'draft' else 'EAGLE head'} is {raw}:PATH)" if raw in what else ""
        raise SystemExit(f"error: --speculative: expected off, ngram, suffix, draft:PATH or eagle:PATH, got {raw!r}{hint}")
    try:
        return config(
            method=method,
            num_speculative_tokens=getattr(args, "num_speculative_tokens", 4),
            adaptive=getattr(args, "speculative_adaptive", True),
            draft_model=draft,
            draft_kv_share=getattr(args, "speculative_draft_kv_share", None),
        )
    except ValueError as exc:
        raise SystemExit(f"error: --speculative / --num-speculative-tokens / --speculative-draft-kv-share: {exc}") from None


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def _layer_list(value: str | None) -> tuple[int, ...]:
    """--kv-cache-dtype-skip-layers "0,1,29" -> (0, 1, 29) (SystemExit naming the flag)."""
    try:
        return tuple(int(item) for item in _csv(value))
    except ValueError:
        raise SystemExit(f"error: --kv-cache-dtype-skip-layers: expected comma-separated layer indices, got {value!r}") from None


def engine_config(args: argparse.Namespace) -> EngineConfig:
    # Here, not at the top: rtpllm.config imports torch, which a gateway never needs.
    from rtpllm.config import CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig, SpeculativeConfig

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    tp = getattr(args, "tensor_parallel_size", 1)
    if device == "cuda" and getattr(args, "gpu_claim_dir", None):
        if tp > 1:
            raise SystemExit("error: --gpu-claim-dir claims one GPU; with --tensor-parallel-size pass --device cuda:N")
        device = claimed_cuda_device(args.gpu_claim_dir)
    speculative = _speculative_config(args, SpeculativeConfig)
    if speculative.method in ("draft", "eagle") and getattr(args, "service", "worker") == "prefill":
        speculative = SpeculativeConfig()  # a prefill instance never decodes: no draft model or head to load
    return EngineConfig(
        model=args.model,
        device=device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        seed=args.seed,
        attention_backend=args.attention_backend,
        load_format=args.load_format,
        cuda_graphs=args.cuda_graphs,
        mixed_cuda_graphs=args.mixed_cuda_graphs,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        speculative=speculative,
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            gpu_memory_utilization=args.gpu_memory_utilization,
            cpu_kv_bytes=int(args.cpu_kv_gib * (1 << 30)),
            enable_prefix_caching=args.prefix_caching,
            kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
            kv_cache_plan=getattr(args, "kv_cache_plan", None),
            kv_cache_dtype_skip_layers=_layer_list(getattr(args, "kv_cache_dtype_skip_layers", None)),
        ),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
        offload=OffloadConfig(
            host_bytes=int(args.kv_host_gib * GIB),
            ssd_dir=args.kv_ssd_dir,
            ssd_bytes=int(args.kv_ssd_gib * GIB),
            redis_url=redis_url(args) if args.kv_redis else None,
            redis_ttl_s=args.kv_redis_ttl,
            write_through={"auto": None, "on": True, "off": False}[args.kv_write_through],
            kvstore_host_id=_host_id(args.kvstore_host_id, "--kvstore-host-id") if args.kvstore else None,
            # One string for the kvstore client: credentials and TLS files ride in it.
            kvstore_nats_url=nats_config(args).as_url() if getattr(args, "nats", None) else "nats://127.0.0.1:4222",
            kv_host=args.kv_host,
            tier_wait_min_s=args.kv_tier_wait_min,
            tier_wait_max_s=args.kv_tier_wait_max,
        ),
        served_model_name=args.served_model_name,
        tensor_parallel_size=tp,
    )


def worker_settings(args: argparse.Namespace) -> WorkerSettings:
    return WorkerSettings(
        engine=engine_config(args),
        nats=nats_config(args),
        redis_url=redis_url(args),
        instance_id=args.instance_id or "",
        heartbeat_interval_s=args.heartbeat_interval,
        lease_s=args.lease,
        drain_timeout_s=args.drain_timeout,
        nats_connect_timeout_s=args.nats_connect_timeout,
        role=getattr(args, "service", "worker"),
        local_prefill_below=getattr(args, "local_prefill_below", 512),
        kv_host=getattr(args, "kv_host", "127.0.0.1"),
        kv_port=getattr(args, "kv_port", 0),
        kv_backends=parse_backends(getattr(args, "kv_backends", "cuda_ipc,shm,tcp")),
        kv_lease_s=getattr(args, "kv_lease", 30.0),
        health_file=args.health_file,
        embedding_pool_bytes=int(getattr(args, "embedding_pool_mib", 256.0) * (1 << 20)),
        local_encode_below=getattr(args, "local_encode_below", 0),
    )


def vision_settings(args: argparse.Namespace) -> VisionSettings:
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    nats = nats_config(args)
    return VisionSettings(
        model=args.model,
        device=device,
        dtype=args.dtype,
        seed=args.seed,
        load_format=args.load_format,
        served_model_name=args.served_model_name,
        nats=nats,
        instance_id=args.instance_id or "",
        heartbeat_interval_s=args.heartbeat_interval,
        lease_s=args.lease,
        cache_bytes=int(args.cache_gib * GIB),
        max_batch_images=args.max_batch_images,
        batch_wait_s=args.batch_wait_ms / 1000.0,
        kvstore_host_id=_host_id(args.kvstore_host_id, "--kvstore-host-id") if args.kvstore else None,
        kvstore_nats_url=nats.as_url(),
        kv_host=args.kv_host,
        kv_backends=parse_backends(args.kv_backends),
        nats_connect_timeout_s=args.nats_connect_timeout,
        health_file=args.health_file,
        # Claimed by the service once it knows it has a tower to run: an idle one (a
        # text model) must not hold a GPU the engines need.
        gpu_claim_dir=getattr(args, "gpu_claim_dir", None) if device == "cuda" else None,
    )


def kvstore_settings(args: argparse.Namespace) -> KVStoreSettings:
    return KVStoreSettings(
        host_id=_host_id(args.host_id, "--host-id"),
        nats=nats_config(args),
        host_bytes=int(args.kv_host_gib * GIB),
        ssd_dir=args.kv_ssd_dir,
        ssd_bytes=int(args.kv_ssd_gib * GIB),
        redis_url=redis_url(args) if args.kv_redis else None,
        redis_ttl_s=args.kv_redis_ttl,
        kv_host=args.kv_host,
        kv_port=args.kv_port,
        staging_bytes=int(args.kv_staging_mib * (1 << 20)),
        transfer_lease_s=args.kv_transfer_lease,
        nats_connect_timeout_s=args.nats_connect_timeout,
        health_file=args.health_file,
    )


def claimed_cuda_device(claim_dir: str) -> str:
    import torch

    from rtpllm.runtime.gpu_claim import NoFreeGPU, claim_gpu

    try:
        index = claim_gpu(claim_dir, torch.cuda.device_count())
    except NoFreeGPU as exc:
        raise SystemExit(f"error: {exc}") from None
    logging.getLogger("rtpllm.worker").info("claimed GPU %d (lock in %s)", index, claim_dir)
    return f"cuda:{index}"


def _host_id(value: str | None, flag: str) -> str:
    if not value:
        return default_host_id()
    try:
        return check_id(value, flag)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def parse_backends(value: str) -> tuple[str, ...]:
    known = ("cuda_ipc", "shm", "tcp")
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise SystemExit(f"error: --kv-backends {value!r}: choose from {', '.join(known)}")
    return names


def run_gateway(args: argparse.Namespace) -> int:
    from services.gateway.main import run

    setup_logging(args.log_level)
    return run(gateway_settings(args), args.log_level)


def run_kvstore(args: argparse.Namespace) -> int:
    from services.kvstore.main import run

    setup_logging(args.log_level)
    settings = kvstore_settings(args)
    if settings.host_bytes <= 0:
        raise SystemExit("error: the kvstore needs --kv-host-gib > 0")
    if args.kv_redis and not args.redis:
        raise SystemExit("error: --kv-redis needs --redis URL")
    return run(settings)


def run_vision(args: argparse.Namespace) -> int:
    from services.vision.main import run

    setup_logging(args.log_level)
    settings = vision_settings(args)
    if settings.cache_bytes <= 0:
        raise SystemExit("error: the vision service needs --cache-gib > 0 (its cache is the pool it ships from)")
    return run(settings)


def run_worker(args: argparse.Namespace) -> int:
    """`serve worker|prefill|decode`: the engine service in that role."""
    import importlib

    run = importlib.import_module(f"services.{args.service}.main").run
    setup_logging(args.log_level)
    return run(worker_settings(args))
