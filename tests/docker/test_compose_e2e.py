"""`docker compose up` for real: the whole topology (nats, redis, kvstore, prefill,
decode, gateway) on the embedded SmolLM2, authenticated with the secrets it made itself,
scaled per service, surviving a crashed decode replica, and leaving nothing behind.

Runs only where a Docker engine and Compose v2 answer (`.ci/run` sets them up with the
shared local-docker tool; elsewhere the test skips). The image build reads the torch
index from RTPLLM_TORCH_INDEX_URL (a local mirror in CI) as the compose file does.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from rtpllm.runtime.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
PROJECT = f"rtpllm-e2e-{os.getpid()}"
MODEL = "smollm2-135m-instruct"

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]


def _docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=20)
        compose = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return info.returncode == 0 and compose.returncode == 0


if not _docker_works():
    if os.environ.get("RTPLLM_REQUIRE_DOCKER") == "1":  # CI set Docker up: not working is a failure
        raise RuntimeError("RTPLLM_REQUIRE_DOCKER=1 but `docker info` / `docker compose version` fail")
    pytest.skip("no working Docker engine with Compose v2 here", allow_module_level=True)


def compose(
    *args: str, env: dict[str, str], timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = ["docker", "compose", "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def get_json(url: str, headers: dict[str, str] | None = None) -> dict:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # /ready answers 503 with a body until ready
        return json.loads(exc.read() or b"{}")


def wait_for(predicate, timeout: float, what: str, step: float = 0.25):  # noqa: ANN001, ANN201 - a test helper
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - not up yet
            last_error = exc
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error!r})")


class ComposeStack:
    def __init__(self, port: int, env: dict[str, str]) -> None:
        self.port, self.env = port, env
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = ""
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)
        self.figures: dict[str, float] = {}

    def read_api_key(self) -> str:
        """The key the `secrets` service made, as the docs tell users to read it."""
        out = compose("exec", "-T", "gateway", "cat", "/run/rtpllm-secrets/api_key", env=self.env, check=False)
        key = out.stdout.strip() if out.returncode == 0 else ""
        if key:
            self.api_key = key
            self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)
        return key

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def ready_counts(self) -> tuple[int, int]:
        body = get_json(f"{self.url}/ready")
        return int(body.get("workers", 0)), int(body.get("prefill", 0))

    def instances(self) -> list[dict]:
        return get_json(f"{self.url}/instances", self.headers)["instances"]

    def chat(self, content: str, max_tokens: int = 16) -> openai.types.chat.ChatCompletion:
        return self.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0
        )

    def container_of(self, instance_id: str) -> str:
        """The container running an engine: its instance id carries the container's
        hostname, which Docker sets to the container id's first 12 hex digits."""
        ids = compose("ps", "-q", env=self.env).stdout.split()
        host = instance_id.split("-")[1]
        return next(c for c in ids if c.startswith(host))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_stacks() -> list[str]:
    """Take down the stacks of earlier runs whose pytest died before its teardown (a
    killed CI run): the engine restarts their containers, which then hold the memory
    this run's replicas need. A stack whose pytest still runs is left alone."""
    labels = subprocess.run(
        ["docker", "ps", "-a", "--format", '{{.Label "com.docker.compose.project"}}'], capture_output=True, text=True, timeout=30
    ).stdout.split()
    stale = []
    for project in sorted(set(labels)):
        prefix, _, pid = project.rpartition("-")
        if prefix == "rtpllm-e2e" and pid.isdigit() and project != PROJECT and not _alive(int(pid)):
            cmd = ["docker", "compose", "-p", project, "-f", str(ROOT / "docker-compose.yml"), "down", "-v", "--remove-orphans", "-t", "5"]
            subprocess.run(cmd, capture_output=True, timeout=120)
            stale.append(project)
    return stale


@pytest.fixture(scope="module")
def stack() -> Iterator[ComposeStack]:
    stale = remove_stale_stacks()
    if stale:
        print(f"\ntook down stale stacks of dead test runs: {stale}")
    # No RTPLLM_API_KEY from the caller's shell: the secrets service makes the key.
    env = {k: v for k, v in os.environ.items() if k != "RTPLLM_API_KEY"}
    env["RTPLLM_PORT"] = str(free_port())
    s = ComposeStack(int(env["RTPLLM_PORT"]), env)
    try:
        compose("build", env=env, timeout=900)
        yield s
    finally:
        logs = compose("logs", "--no-color", "--timestamps", "--tail", "60", env=env, check=False).stdout
        compose("down", "-v", "--remove-orphans", "-t", "10", env=env, check=False)
        leftover = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        if s.figures:
            print("\ncompose figures:", json.dumps(s.figures))
        print("\nthe services' last log lines:\n" + logs)  # pytest shows them when the test failed
        assert not leftover, f"containers left after down: {leftover}\n{logs}"


def test_compose_up_scale_crash_and_down(stack: ComposeStack) -> None:
    # 1. `up` to the first answer through the gateway, with the openai client.
    start = time.monotonic()
    compose("up", "-d", env=stack.env, timeout=300)
    # The key from the secrets volume, read in the gateway's container as users do.
    key = wait_for(stack.read_api_key, 120, "the API key in the gateway's container", 0.5)
    assert key.startswith("rtpllm-")
    # Before any decode instance is ready the gateway answers 503 + Retry-After, never a
    # misleading error; afterwards, the answer.
    reply = wait_for(lambda: stack.chat("What is the capital of France?"), 240, "the first chat answer", 0.5)
    stack.figures["up_to_first_answer_s"] = round(time.monotonic() - start, 1)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    # Without the key: 401 in OpenAI's format; the healthcheck's /ready stays open.
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        request = urllib.request.Request(
            f"{stack.url}/v1/chat/completions", body, {"Content-Type": "application/json", **headers}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        assert json.loads(refused.value.read())["error"]["code"] == "invalid_api_key"
    assert get_json(f"{stack.url}/ready")["status"] == "ready"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{stack.url}/metrics", timeout=10)
    assert refused.value.code == 401
    # Redis wants its password: an unauthenticated PING in its container is refused.
    noauth = compose("exec", "-T", "redis", "redis-cli", "ping", env=stack.env, check=False)
    assert "NOAUTH" in noauth.stdout + noauth.stderr, noauth
    image_bytes = subprocess.run(["docker", "image", "inspect", "rtpllm:latest", "--format", "{{.Size}}"],
                                 capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stack.figures["image_gb"] = round(int(image_bytes) / 1e9, 2)
    assert int(image_bytes) <= 1.3e9, f"the CPU image is {int(image_bytes) / 1e9:.2f} GB (limit 1.3)"

    # 2. Scale decode and prefill; every replica registers and serves.
    start = time.monotonic()
    compose(
        "up", "-d", "--no-recreate", "--scale", "decode=2", "--scale", "prefill=2", env=stack.env, timeout=300
    )
    wait_for(
        lambda: stack.ready_counts() == (2, 2), 180, "2 decode and 2 prefill instances behind the gateway"
    )
    stack.figures["scale_to_ready_s"] = round(time.monotonic() - start, 1)

    def served_by_all() -> bool:
        # Long, distinct prompts (over the 512-token local-prefill threshold), several at
        # once: decode instances take them by load, and hand their prefill to a prefill
        # instance, also by load.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            prompts = [
                f"Request {i} at {time.time()}: " + "tell me about the sea and the sky. " * 90
                for i in range(4)
            ]
            for reply in pool.map(lambda p: stack.chat(p, max_tokens=4), prompts):
                assert reply.usage.prompt_tokens > 512
        items = stack.instances()
        decodes = [i for i in items if i["role"] == "decode"]
        prefills = [i for i in items if i["role"] == "prefill"]
        return (
            len(decodes) == 2 and len(prefills) == 2
            and all(i["load"]["generation_tokens"] > 0 for i in decodes)
            and all(i["load"]["prompt_tokens"] > 0 and i["disaggregation"]["transfers"].get("tcp", {}).get("transfers", 0) > 0 for i in prefills)
        )  # fmt: skip

    wait_for(served_by_all, 240, "every decode and prefill replica to serve requests", 0)
    metrics = urllib.request.urlopen(urllib.request.Request(f"{stack.url}/metrics", headers=stack.headers), timeout=5).read().decode()
    for inst in stack.instances():
        # Per-instance metrics: every replica is there, with its KV usage reported.
        assert re.search(rf'rtpllm_kv_usage{{instance="{inst["instance_id"]}"', metrics), inst["instance_id"]

    # 3. A decode replica crashes mid-stream (SIGKILL to its process): the client gets its
    # answer or a clear error within 5 s, and the rest keeps serving.
    stream = stack.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        max_tokens=2000, temperature=0.8, stream=True,
    )  # fmt: skip
    chunks = iter(stream)
    next(chunks)  # the stream is under way
    # The gateway's own count, not the heartbeat's load, which may still show the last batch.
    busy = wait_for(
        lambda: [
            i for i in stack.instances() if i["role"] == "decode" and i["inflight_from_this_gateway"] > 0
        ],
        10,
        "the busy decode",
    )
    assert len(busy) == 1
    container = stack.container_of(busy[0]["instance_id"])
    pid = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Pid}}", container], capture_output=True, text=True, check=True
    ).stdout.strip()
    killed_at = time.monotonic()
    os.kill(int(pid), 9)
    outcome = "answered"
    try:
        for _ in chunks:
            pass
    except openai.APIError as exc:
        outcome = f"error: {exc}"
    ended_after = time.monotonic() - killed_at
    stack.figures["stream_end_after_kill_s"] = round(ended_after, 1)
    assert ended_after <= 5.0, f"the stream took {ended_after:.1f} s to end after its decode died ({outcome})"
    reply = stack.chat("What is the capital of France?")
    assert "Paris" in reply.choices[0].message.content
    # The restart policy brings the crashed replica back, and it registers again.
    wait_for(lambda: stack.ready_counts() == (2, 2), 120, "the crashed decode replica to come back")
