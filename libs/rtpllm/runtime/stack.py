"""A whole rtpllm stack as child processes: NATS, Redis, optionally the host's kvstore,
workers, gateway.

`rtpllm up` runs one in the foreground; integration tests start them with a tiny model.
Stop order is gateway (stops taking requests, cancels what it runs), workers (drain),
the kvstore, then Redis and NATS.

By default the stack authenticates everything it starts (docs/serving.md#security):
nats-server wants a token and redis-server a password, both made for this stack, and
the gateway an API key. Children get them through their environment, never on argv.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rtpllm.credentials import new_api_key, new_secret
from rtpllm.runtime.processes import (
    LOOPBACK,
    ManagedProcess,
    free_port,
    http_json,
    rtpllm_command,
    start_nats,
    start_redis,
    wait_until,
)

KVSTORE_READY_LINE = "kvstore ready"  # services/kvstore/main.py logs it once it serves
VISION_READY_LINE = "vision ready"  # services/vision/main.py logs it once it serves

# Connection variables a shell may export; blanked for the children, which talk to this
# stack's own servers with this stack's credentials.
_INHERITED_BUS_VARS = (
    "RTPLLM_NATS_TOKEN", "RTPLLM_NATS_TOKEN_FILE", "RTPLLM_NATS_USER", "RTPLLM_NATS_PASSWORD",
    "RTPLLM_NATS_TLS_CA", "RTPLLM_NATS_TLS_CERT", "RTPLLM_NATS_TLS_KEY",
    "RTPLLM_REDIS_PASSWORD", "RTPLLM_REDIS_PASSWORD_FILE",
)  # fmt: skip


@dataclass
class StackConfig:
    """What to start. `worker_args`/`gateway_args` are extra CLI flags of each service."""

    model: str
    served_model_name: str | None = None
    workers: int = 1
    # Disaggregated topology: with decode > 0, `prefill` prefill instances and `decode`
    # decode instances replace the combined workers; decode_args go to decode ones only.
    prefill: int = 0
    decode: int = 0
    decode_args: list[str] = field(default_factory=list)
    role_env: dict[str, dict[str, str]] = field(default_factory=dict)  # extra environment per role (tests)
    host: str = LOOPBACK
    port: int = 0  # 0: a free port
    nats_port: int = 0
    redis_port: int = 0
    use_redis: bool = True
    # One kvstore process (`rtpllm serve kvstore`, with kvstore_args) started before the
    # engines; give the engines `--kvstore` (worker_args) to use it.
    kvstore: bool = False
    kvstore_args: list[str] = field(default_factory=list)
    # Vision services (`rtpllm serve vision`, with vision_args) of a vision-language
    # model, started before the engines.
    vision: int = 0
    vision_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None  # one log file per child; else output goes to `echo`
    echo: IO[str] | None = None
    log_level: str = "info"
    # Authentication: a token for NATS and a password for Redis, made for this stack, and
    # the gateway's API keys (one is made when none is given). False: all open.
    auth: bool = True
    api_keys: tuple[str, ...] = ()


class Stack:
    """Starts and stops the processes of one stack; use as a context manager."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.nats: ManagedProcess | None = None
        self.redis: ManagedProcess | None = None
        self.gateway: ManagedProcess | None = None
        self.kvstore: ManagedProcess | None = None
        self.visions: list[ManagedProcess] = []
        self.workers: list[ManagedProcess] = []
        # With their credentials in them: what a client of this stack connects with.
        self.nats_url = ""
        self.redis_url: str | None = None
        self.nats_token = new_secret() if config.auth else None
        self.redis_password = new_secret() if config.auth else None
        self.api_keys: tuple[str, ...] = tuple(config.api_keys) or ((new_api_key(),) if config.auth else ())
        self.port = config.port or free_port(config.host if config.host != "0.0.0.0" else LOOPBACK)
        self._worker_ids = itertools.count()
        self.instance_ids: dict[str, str] = {}  # worker process name -> its instance id on the bus

    @property
    def api_key(self) -> str | None:
        """The key clients of the gateway send (None: the API is open)."""
        return self.api_keys[0] if self.api_keys else None

    @property
    def auth_headers(self) -> dict[str, str]:
        """HTTP headers that authenticate a client to the gateway."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def bus_env(self) -> dict[str, str]:
        """Environment of a service on this stack's bus: the NATS and Redis URLs with
        their credentials. Secrets go to children this way, never on argv, which `ps`
        shows to every user of the host."""
        env = dict.fromkeys(_INHERITED_BUS_VARS, "")
        env["RTPLLM_NATS_URL"] = self.nats_url
        env["RTPLLM_REDIS_URL"] = self.redis_url or ""
        return env

    def gateway_env(self) -> dict[str, str]:
        """`bus_env` plus the gateway's API keys."""
        return {**self.bus_env(), "RTPLLM_API_KEY": ",".join(self.api_keys), "RTPLLM_API_KEY_FILE": ""}

    @property
    def url(self) -> str:
        host = LOOPBACK if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.port}"

    def _log(self, name: str) -> Path | None:
        return self.config.log_dir / f"{name}.log" if self.config.log_dir else None

    def _model_flags(self) -> list[str]:
        flags = ["--model", self.config.model]
        if self.config.served_model_name:
            flags += ["--served-model-name", self.config.served_model_name]
        return flags

    def _bus_flags(self) -> list[str]:
        return ["--log-level", self.config.log_level]  # the servers' URLs come in bus_env

    # -- starting --------------------------------------------------------------------

    def start_infra(self) -> None:
        c = self.config
        self.nats, self.nats_url = start_nats(c.nats_port, token=self.nats_token, log_path=self._log("nats"), echo=c.echo)
        if c.use_redis:
            self.redis, self.redis_url = start_redis(
                c.redis_port, password=self.redis_password, log_path=self._log("redis"), echo=c.echo
            )

    def start_kvstore(self, extra_args: Sequence[str] = (), timeout: float = 60.0) -> ManagedProcess:
        """Start the kvstore and wait until it serves (its ready line)."""
        argv = rtpllm_command("serve", "kvstore", *self._bus_flags(), *self.config.kvstore_args, *extra_args)
        ready = threading.Event()
        proc = ManagedProcess("kvstore", argv, env=self.bus_env(), log_path=self._log("kvstore"), echo=self.config.echo)
        proc.on_line(lambda line: ready.set() if KVSTORE_READY_LINE in line else None)
        self.kvstore = proc.start()
        try:
            wait_until(ready.is_set, timeout, "the kvstore", [proc], 0.05)
        except BaseException:
            proc.stop(5)
            raise
        return proc

    def add_vision(self, extra_args: Sequence[str] = (), timeout: float = 120.0, wait: bool = True) -> ManagedProcess:
        """Start a vision service (and, with `wait`, wait until it serves)."""
        name = f"vision-{len(self.visions)}"
        argv = rtpllm_command(
            "serve", "vision", *self._bus_flags(), *self._model_flags(), "--instance-id", f"{name}-{uuid.uuid4().hex[:8]}",
            *self.config.vision_args, *extra_args,
        )  # fmt: skip
        ready = threading.Event()
        env = {**self.bus_env(), **self.config.role_env.get("vision", {})}
        proc = ManagedProcess(name, argv, env=env, log_path=self._log(name), echo=self.config.echo)
        proc.on_line(lambda line: ready.set() if VISION_READY_LINE in line else None)
        self.visions.append(proc.start())
        if wait:
            try:
                wait_until(ready.is_set, timeout, f"the vision service {name}", [proc], 0.05)
            except BaseException:
                proc.stop(5)
                raise
        return proc

    def add_worker(self, extra_args: Sequence[str] = (), role: str = "worker") -> ManagedProcess:
        """Start an engine service: a combined worker, or a prefill or decode instance."""
        name = f"{role}-{next(self._worker_ids)}"
        instance_id = f"{name}-{uuid.uuid4().hex[:8]}"  # unique per start, known to the supervisor
        role_args = self.config.decode_args if role == "decode" else []
        argv = rtpllm_command(
            "serve", role, *self._bus_flags(), *self._model_flags(), "--instance-id", instance_id,
            *self.config.worker_args, *role_args, *extra_args,
        )  # fmt: skip
        env = {**self.bus_env(), **self.config.role_env.get(role, {})}
        proc = ManagedProcess(name, argv, env=env, log_path=self._log(name), echo=self.config.echo).start()
        self.workers.append(proc)
        self.instance_ids[name] = instance_id
        return proc

    def worker_by_instance(self, instance_id: str) -> ManagedProcess:
        names = {iid: name for name, iid in self.instance_ids.items()}
        return next(p for p in self.workers if p.name == names[instance_id])

    def start_gateway(self, extra_args: Sequence[str] = ()) -> ManagedProcess:
        c = self.config
        argv = rtpllm_command(
            "serve", "gateway", *self._bus_flags(), *self._model_flags(),
            "--host", c.host, "--port", str(self.port), *c.gateway_args, *extra_args,
        )  # fmt: skip
        self.gateway = ManagedProcess("gateway", argv, env=self.gateway_env(), log_path=self._log("gateway"), echo=c.echo).start()
        return self.gateway

    def start(self) -> Stack:
        """Start everything (returns at once; call wait_ready)."""
        try:
            self.start_infra()
            if self.config.kvstore:
                self.start_kvstore()
            for _ in range(self.config.vision):
                self.add_vision()
            self.add_engines()
            self.start_gateway()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def disaggregated(self) -> bool:
        return self.config.decode > 0

    def add_engines(self) -> None:
        """The configured engine services: prefill + decode instances, or workers."""
        if self.disaggregated:
            for _ in range(self.config.prefill):
                self.add_worker(role="prefill")
            for _ in range(self.config.decode):
                self.add_worker(role="decode")
        else:
            for _ in range(self.config.workers):
                self.add_worker()

    # -- readiness -------------------------------------------------------------------

    def ready_status(self) -> tuple[int, dict | None]:
        return http_json(f"{self.url}/ready", timeout=1.0)

    def live_workers(self) -> int:
        """Instances taking requests behind the gateway (workers or decode instances)."""
        return self.live_counts()[0]

    def live_counts(self) -> tuple[int, int]:
        """(workers or decode instances, prefill instances) the gateway knows alive."""
        status, body = self.ready_status()
        if not isinstance(body, dict):
            return 0, 0
        return int(body.get("workers", 0)), int(body.get("prefill", 0))

    def wait_ready(self, timeout: float = 120.0, workers: int | None = None, on_tick: Callable[[float], None] | None = None) -> None:
        """Until the gateway answers /ready with `workers` live workers (default: all
        started; decode instances count as workers) and all prefill instances."""
        c = self.config
        want = (c.decode if self.disaggregated else c.workers) if workers is None else workers
        want_prefill = c.prefill if self.disaggregated else 0

        def ready() -> bool:
            served, prefill = self.live_counts()
            return served >= want and prefill >= want_prefill

        watch = [p for p in (self.nats, self.redis, self.kvstore, self.gateway, *self.workers, *self.visions) if p is not None]
        what = f"{want} decode and {want_prefill} prefill instance(s)" if self.disaggregated else f"{want} worker(s)"
        wait_until(ready, timeout, f"{what} behind the gateway", watch, 0.2, on_tick)

    # -- stopping --------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> None:
        if self.gateway is not None:
            self.gateway.stop(timeout)
        for proc in (*self.workers, *self.visions):
            proc.signal(15)  # all drain in parallel
        for proc in (*self.workers, *self.visions):
            proc.stop(timeout)
        for proc in (self.kvstore, self.redis, self.nats):
            if proc is not None:
                proc.stop(5)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
