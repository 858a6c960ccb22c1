"""`rtpllm up`: the whole stack in the foreground until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rtpllm.cli import options
from rtpllm.cli.flags import Flag
from rtpllm.credentials import new_api_key, redact_url, write_secret_file
from rtpllm.runtime.processes import LOOPBACK, ProcessFailed, port_open
from rtpllm.runtime.stack import Stack, StackConfig


def flags_to_argv(flags: list[Flag], args: argparse.Namespace) -> list[str]:
    """The command-line form of the parsed values of `flags` (to pass them on to a child)."""
    argv: list[str] = []
    for flag in flags:
        value = getattr(args, flag.dest)
        if flag.boolean:
            if value is not None:  # None: the child's own default
                argv.append(flag.name if value else f"--no-{flag.name[2:]}")
        elif value is not None:
            argv += [flag.name, str(value)]
    return argv


def choose_topology(workers: int, prefill: int | None, decode: int | None) -> tuple[int, int, int]:
    """(workers, prefill, decode) to start. The default is the compose topology, one
    prefill and one decode instance; `--workers N` asks for N aggregated workers instead."""
    if workers < 0 or (prefill or 0) < 0 or (decode or 0) < 0:
        raise ValueError("--workers, --prefill and --decode take counts >= 0")
    if workers:
        if prefill or decode:
            raise ValueError("--workers N (aggregated workers) or --prefill/--decode (disaggregated), not both")
        return workers, 0, 0
    decode = 1 if decode is None else decode
    prefill = 1 if prefill is None else prefill
    if decode < 1:
        raise ValueError("--decode must be >= 1: decode instances take the requests (or pass --workers N)")
    return 0, prefill, decode


# Engine flags `up` passes on to its vision services too.
_VISION_SHARED = ("--device", "--dtype", "--seed", "--load-format", "--kvstore-host-id")


def _has_vision(model_dir: str) -> bool:
    """Whether the (prepared) model is vision-language: `up` then starts a vision service."""
    from rtpllm.models.config import ModelConfig

    try:
        return ModelConfig.from_dir(model_dir).vision is not None
    except (OSError, ValueError):
        return False  # the engines will report what is wrong with the model


def _say(message: str) -> None:
    print(f"rtpllm up: {message}", flush=True)


def _prepare_model(model: str) -> Path:
    """Resolve (and on first use convert) the model here, once, with a progress line,
    instead of in every worker."""
    from rtpllm.models.registry import resolve_model

    done = threading.Event()

    def ticker() -> None:
        start = time.monotonic()
        while not done.wait(5.0):
            _say(f"still preparing {model} ({time.monotonic() - start:.0f} s; converting the embedded GGUF on first use)")

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        return resolve_model(model)
    finally:
        done.set()


API_KEY_FILE = "api_key"  # in $RTPLLM_CACHE_DIR: the key `up` made, for clients (and the next `up`)


def gateway_api_keys(args: argparse.Namespace) -> tuple[tuple[str, ...], str]:
    """The gateway's API keys and where they come from: --api-key / --api-key-file, else
    the key saved in $RTPLLM_CACHE_DIR/api_key by an earlier `up` (clients configured
    once keep working), else a new one saved there (0600). None with --no-auth."""
    from rtpllm.api.auth import load_api_keys
    from rtpllm.models.registry import cache_root

    if not args.auth:
        return (), "off"
    keys = load_api_keys(args.api_key, args.api_key_file)
    if keys:
        return keys, "--api-key" if args.api_key else str(args.api_key_file)
    path = cache_root() / API_KEY_FILE
    if path.is_file():
        return load_api_keys(None, path), str(path)
    key = new_api_key()
    write_secret_file(path, key)
    return (key,), f"{path}, new"


def _tensor_parallel_error(model: str, size: int) -> str | None:
    """Why `size` ranks cannot split the model, found before any service starts (else every
    worker would fail the same way, later, in its log), or None."""
    if size <= 1:
        return None
    from rtpllm.models.config import ModelConfig
    from rtpllm.parallel.layout import check_divisible

    try:
        config = ModelConfig.from_dir(model)
    except Exception:  # noqa: BLE001 - a layout this check does not read: the workers say what is wrong
        return None
    try:
        check_divisible(config, size)
    except ValueError as exc:
        return str(exc)
    return None


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_up(args: argparse.Namespace) -> int:
    model, served = args.model, args.served_model_name
    if not Path(model).expanduser().is_dir():
        _say(f"preparing model {model} ...")
        try:
            model_dir = _prepare_model(model)
        except (ValueError, ModuleNotFoundError, FileNotFoundError) as exc:
            _say(f"error: {exc}")
            return 2
        served = served or model  # clients keep using the friendly name
        model = str(model_dir)
        _say(f"model ready in {model}")
    check_host = LOOPBACK if args.host in ("0.0.0.0", "") else args.host
    if args.port and port_open(check_host, args.port):
        # Else its /ready, not ours, could answer the readiness wait.
        _say(f"error: port {args.port} on {check_host} is in use (another `rtpllm up`?); pass a free --port")
        return 1
    try:
        workers, prefill, decode = choose_topology(args.workers, args.prefill, args.decode)
    except ValueError as exc:
        _say(f"error: {exc}")
        return 2
    tp_error = _tensor_parallel_error(model, args.tensor_parallel_size)
    if tp_error:
        _say(f"error: {tp_error}")
        return 2
    vision = args.vision if args.vision is not None else (1 if _has_vision(model) else 0)
    if vision < 0:
        _say("error: --vision takes a count >= 0")
        return 2
    worker_flags, kvstore_args = options.UP_ENGINE, []
    if args.kvstore:
        # The tier flags configure the one kvstore; the engines use it instead of their own.
        tiers = {f.name for f in options.KV_TIERS}
        worker_flags = [f for f in options.UP_ENGINE if f.name not in tiers]
        kvstore_args = flags_to_argv(options.KV_TIERS, args)
        if args.kv_host_gib <= 0:  # not given: the kvstore's own default
            i = kvstore_args.index("--kv-host-gib")
            del kvstore_args[i : i + 2]
        if args.kvstore_host_id:
            kvstore_args += ["--host-id", args.kvstore_host_id]
    try:
        api_keys, key_source = gateway_api_keys(args)
    except (OSError, ValueError) as exc:
        _say(f"error: API key: {exc}")
        return 2
    if not args.auth:
        _say("authentication is off (--no-auth): the API, NATS and Redis are open to anyone who reaches them")
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    config = StackConfig(
        model=model,
        served_model_name=served,
        workers=workers,
        prefill=prefill,
        decode=decode,
        decode_args=flags_to_argv(options.DISAGG, args),
        host=args.host,
        port=args.port,
        nats_port=args.nats_port,
        redis_port=args.redis_port,
        use_redis=args.redis_server,
        kvstore=args.kvstore,
        kvstore_args=kvstore_args,
        vision=vision,
        # The tower runs where the engines do, from the same weights (and seed).
        vision_args=[*flags_to_argv([f for f in options.VISION if f.name in _VISION_SHARED], args), *(["--kvstore"] if args.kvstore else [])],
        worker_args=flags_to_argv(worker_flags, args),
        gateway_args=[
            "--router", args.router,
            "--max-running", str(args.max_running),
            "--max-queue", str(args.max_queue),
            "--request-timeout", str(args.request_timeout),
            *([] if args.protect_metrics else ["--no-protect-metrics"]),
            *flags_to_argv(options.IMAGES, args),
            *flags_to_argv(options.TOOLS, args),
            *flags_to_argv(options.GATEWAY_LOGS, args),
        ],  # fmt: skip
        log_dir=log_dir,
        echo=None if log_dir else sys.stdout,
        log_level=args.log_level,
        auth=args.auth,
        api_keys=api_keys,
    )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Explicitly: a process started in the background by a script inherits SIGINT ignored,
    # and `kill -INT` should stop it as Ctrl-C does.
    signal.signal(signal.SIGINT, _raise_interrupt)
    stack = Stack(config)
    try:
        _say("starting nats-server" + (" and redis-server" if config.use_redis else ""))
        stack.start_infra()
        secured = " (token and password made for this run)" if config.auth else ""
        _say(f"NATS at {redact_url(stack.nats_url)}" + (f", Redis at {redact_url(stack.redis_url)}" if stack.redis_url else "") + secured)
        if config.kvstore:
            _say("starting the kvstore")
            stack.start_kvstore()
        if vision:
            _say(f"starting {vision} vision service(s)")
            for _ in range(vision):
                stack.add_vision()
        topology = (
            f"{prefill} prefill and {decode} decode instance(s)" if stack.disaggregated else f"{workers} worker(s)"
        )
        _say(f"starting {topology} and the gateway; loading {served or model} ...")
        stack.add_engines()
        stack.start_gateway()
        last = [0.0]

        def progress(elapsed: float) -> None:
            if elapsed - last[0] >= 5.0:
                last[0] = elapsed
                served_n, prefill_n = stack.live_counts()
                done = f"{served_n}+{prefill_n}" if stack.disaggregated else f"{served_n}"
                _say(f"waiting for engines to load the model: {done} of {topology} ready ({elapsed:.0f} s)")

        stack.wait_ready(args.ready_timeout, on_tick=progress)
        _say(f"ready: {topology} serving {served or Path(model).name!r}")
        _say(f"OpenAI-compatible API at {stack.url}/v1  (metrics: {stack.url}/metrics)  -- Ctrl-C to stop")
        if stack.api_key:
            # Printed on purpose: the foreground user needs it (as Jupyter prints its token).
            _say(f"API key: {stack.api_key} ({key_source}); clients send `Authorization: Bearer <key>`")
        return _supervise(stack)
    except KeyboardInterrupt:
        _say("stopping ...")
        return 0
    except (ProcessFailed, TimeoutError, FileNotFoundError) as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stack.stop()
        _say("stopped")


def _supervise(stack: Stack) -> int:
    """Run until interrupted. A dead gateway or NATS ends the stack; an engine that dies,
    or stays alive but unregistered with the gateway, is reported and restarted, and so
    is a dead kvstore (rtpllm.runtime.supervisor)."""
    from rtpllm.runtime.supervisor import Supervisor

    supervisor = Supervisor(stack, _say)
    while True:
        time.sleep(0.5)
        for proc in (stack.gateway, stack.nats):
            if proc is not None and not proc.alive:
                _say(f"{proc.name} exited (code {proc.returncode}); last output:\n{proc.tail()}")
                return 1
        supervisor.tick()
