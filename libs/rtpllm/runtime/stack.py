"""A whole rtpllm stack as child processes: NATS, Redis, workers, gateway.

`rtpllm up` runs one in the foreground; integration tests start them with a tiny model.
Stop order is gateway (stops taking requests, cancels what it runs), workers (drain),
then Redis and NATS.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

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


@dataclass
class StackConfig:
    """What to start. `worker_args`/`gateway_args` are extra CLI flags of each service."""

    model: str
    served_model_name: str | None = None
    workers: int = 1
    host: str = LOOPBACK
    port: int = 0  # 0: a free port
    nats_port: int = 0
    redis_port: int = 0
    use_redis: bool = True
    worker_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None  # one log file per child; else output goes to `echo`
    echo: IO[str] | None = None
    log_level: str = "info"


class Stack:
    """Starts and stops the processes of one stack; use as a context manager."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.nats: ManagedProcess | None = None
        self.redis: ManagedProcess | None = None
        self.gateway: ManagedProcess | None = None
        self.workers: list[ManagedProcess] = []
        self.nats_url = ""
        self.redis_url: str | None = None
        self.port = config.port or free_port(config.host if config.host != "0.0.0.0" else LOOPBACK)
        self._worker_ids = itertools.count()
        self.instance_ids: dict[str, str] = {}  # worker process name -> its instance id on the bus

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
        flags = ["--nats", self.nats_url, "--log-level", self.config.log_level]
        if self.redis_url:
            flags += ["--redis", self.redis_url]
        return flags

    # -- starting --------------------------------------------------------------------

    def start_infra(self) -> None:
        c = self.config
        self.nats, self.nats_url = start_nats(c.nats_port, log_path=self._log("nats"), echo=c.echo)
        if c.use_redis:
            self.redis, self.redis_url = start_redis(c.redis_port, log_path=self._log("redis"), echo=c.echo)

    def add_worker(self, extra_args: Sequence[str] = ()) -> ManagedProcess:
        name = f"worker-{next(self._worker_ids)}"
        instance_id = f"{name}-{uuid.uuid4().hex[:8]}"  # unique per start, known to the supervisor
        argv = rtpllm_command(
            "serve", "worker", *self._bus_flags(), *self._model_flags(), "--instance-id", instance_id,
            *self.config.worker_args, *extra_args,
        )  # fmt: skip
        proc = ManagedProcess(name, argv, log_path=self._log(name), echo=self.config.echo).start()
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
        self.gateway = ManagedProcess("gateway", argv, log_path=self._log("gateway"), echo=c.echo).start()
        return self.gateway

    def start(self) -> Stack:
        """Start everything (returns at once; call wait_ready)."""
        try:
            self.start_infra()
            for _ in range(self.config.workers):
                self.add_worker()
            self.start_gateway()
        except BaseException:
            self.stop()
            raise
        return self

    # -- readiness -------------------------------------------------------------------

    def ready_status(self) -> tuple[int, dict | None]:
        return http_json(f"{self.url}/ready", timeout=1.0)

    def live_workers(self) -> int:
        status, body = self.ready_status()
        return int(body.get("workers", 0)) if isinstance(body, dict) else 0

    def wait_ready(self, timeout: float = 120.0, workers: int | None = None, on_tick: Callable[[float], None] | None = None) -> None:
        """Until the gateway answers /ready with `workers` live workers (default: all started)."""
        want = self.config.workers if workers is None else workers
        watch = [p for p in (self.nats, self.redis, self.gateway, *self.workers) if p is not None]
        wait_until(lambda: self.live_workers() >= want, timeout, f"{want} worker(s) behind the gateway", watch, 0.2, on_tick)

    # -- stopping --------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> None:
        if self.gateway is not None:
            self.gateway.stop(timeout)
        for proc in self.workers:
            proc.signal(15)  # all drain in parallel
        for proc in self.workers:
            proc.stop(timeout)
        for proc in (self.redis, self.nats):
            if proc is not None:
                proc.stop(5)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
