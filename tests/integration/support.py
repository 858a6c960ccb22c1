"""Helpers of the integration tests: stacks of real processes and extra gateways."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import openai

from rtpllm.runtime.processes import ManagedProcess, free_port, http_json, rtpllm_command, wait_until
from rtpllm.runtime.stack import Stack, StackConfig

MODEL_NAME = "tiny-llama"
# Enough KV for 64 concurrent requests; max-num-seqs above the concurrency tests' load.
WORKER_ARGS = ["--num-blocks", "1024", "--max-num-seqs", "128", "--drain-timeout", "5"]


# The stacks `start_stack` started that may still run: a failed test gets their logs'
# tails in its report (tests/integration/conftest.py), since a test's failure never
# reaches its fixture's `except`.
_STARTED: dict[Path, Stack] = {}


def log_tails(log_dir: Path, chars: int = 4000) -> str:
    return "".join(f"\n===== {path.name} (tail) =====\n{path.read_text(errors='replace')[-chars:]}\n" for path in sorted(log_dir.glob("*.log")))


def dump_logs(log_dir: Path) -> None:
    sys.stderr.write(log_tails(log_dir))


def running_stacks_logs() -> list[tuple[str, str]]:
    """(log dir, the tails of its logs) of each started stack whose gateway still runs."""
    out = []
    for log_dir, stack in list(_STARTED.items()):
        if stack.gateway is None or not stack.gateway.alive:
            del _STARTED[log_dir]
            continue
        out.append((str(log_dir), log_tails(log_dir)))
    return out


def wait_until_ready(up: subprocess.Popen[str]) -> str:
    """`rtpllm up`'s output up to its "ready:" line (or its exit)."""
    lines: list[str] = []
    assert up.stdout is not None
    for line in up.stdout:
        lines.append(line)
        if "ready:" in line or up.poll() is not None:
            break
    return "".join(lines)


def stop_up(up: subprocess.Popen[str]) -> None:
    """Stop `rtpllm up` as a user does (Ctrl-C); killed if it is not gone in 30 s."""
    up.send_signal(signal.SIGINT)
    try:
        up.wait(30)
    except subprocess.TimeoutExpired:
        up.kill()


def start_stack(
    tiny_model: Path,
    log_dir: Path,
    workers: int,
    gateway_args: list[str] | None = None,
    worker_args: list[str] | None = None,
    **disaggregation: Any,
) -> Stack:
    """A stack of `workers` combined workers, or with `prefill=N, decode=M` (and
    optionally decode_args, role_env) a disaggregated one."""
    stack = Stack(
        StackConfig(
            model=str(tiny_model),
            workers=workers,
            worker_args=WORKER_ARGS + (worker_args or []),  # later flags win
            gateway_args=gateway_args or [],
            log_dir=log_dir,
            **disaggregation,
        )
    )
    try:
        stack.start()
        stack.wait_ready(timeout=120)
    except BaseException:
        stack.stop()
        dump_logs(log_dir)
        raise
    _STARTED[log_dir] = stack
    return stack


@contextmanager
def running_stack(tiny_model: Path, log_dir: Path, workers: int, **kwargs: Any) -> Iterator[Stack]:
    """`start_stack` for a module fixture: logs dumped if the tests fail, always stopped."""
    stack = start_stack(tiny_model, log_dir, workers, **kwargs)
    try:
        yield stack
    except BaseException:
        dump_logs(log_dir)
        raise
    finally:
        stack.stop()


class Gateway(Protocol):
    """A gateway the tests talk to: a Stack's, an ExtraGateway, an Endpoint."""

    url: str
    api_key: str | None


@dataclass
class Endpoint:
    """A gateway known by its URL and key (one `rtpllm up` started, say)."""

    url: str
    api_key: str | None


def auth_headers(gateway: Gateway) -> dict[str, str]:
    """The headers that authenticate to `gateway` (stacks run with an API key by default)."""
    return {"Authorization": f"Bearer {gateway.api_key}"} if gateway.api_key else {}


def client_for(gateway: Gateway) -> openai.OpenAI:
    """An OpenAI client with the gateway's key, without retries (the tests check exact
    status codes)."""
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.api_key or "none", max_retries=0, timeout=60)


def http_client(gateway: Gateway, **kwargs: Any) -> httpx.Client:
    """An httpx client on the gateway, with its key."""
    return httpx.Client(base_url=gateway.url, headers=auth_headers(gateway), **kwargs)


def get(gateway: Gateway, path: str, **kwargs: Any) -> httpx.Response:
    """GET a path of the gateway (/instances, /metrics: they need the key too)."""
    return httpx.get(f"{gateway.url}{path}", headers=auth_headers(gateway), **kwargs)


class ExtraGateway:
    """A second gateway on the shared bus, with its own flags and the stack's API keys."""

    def __init__(self, stack: Stack, args: list[str], log_dir: Path, name: str) -> None:
        self.port = free_port()
        argv = rtpllm_command(
            "serve", "gateway", "--model", stack.config.model, "--host", "127.0.0.1", "--port", str(self.port), *args,
        )  # fmt: skip
        # The bus URL (with its token) and the keys through the environment, as the stack does.
        self.proc = ManagedProcess(name, argv, env=stack.gateway_env(), log_path=log_dir / f"{name}.log").start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = stack.api_key

    def wait_up(self, timeout: float = 60) -> None:
        wait_until(lambda: http_json(f"{self.url}/health")[0] == 200, timeout, f"{self.proc.name}", [self.proc])

    def stop(self) -> None:
        self.proc.stop(10)


def ask(client: openai.OpenAI, prompt: list[int]) -> tuple[str, int]:
    """A short greedy completion: (text, cached prompt tokens)."""
    resp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    details = resp.usage.prompt_tokens_details if resp.usage is not None else None
    return resp.choices[0].text, details.cached_tokens if details is not None and details.cached_tokens else 0


def serving_ids(stack: Stack) -> set[str]:
    """Instance ids the gateway routes to now."""
    return {i["instance_id"] for i in get(stack, "/instances").json()["instances"]}


def restart_one_worker(stack: Stack) -> None:
    """Stop one serving worker (SIGTERM) and start a fresh one in its place; returns once
    the gateway routes to exactly the two live workers again (the old one's lease ended)."""
    before = serving_ids(stack)
    victim = next(p for p in stack.workers if p.alive and stack.instance_ids[p.name] in before)
    victim.stop(15)
    stack.workers.remove(victim)  # stopped on purpose: not a failure for wait_ready
    stack.add_worker()
    stack.wait_ready(timeout=60, workers=2)
    deadline = time.monotonic() + 10
    while len(serving_ids(stack)) != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
