"""`docker compose up` as a user meets it: image size, time to the first answer (cold:
a new model volume, converted on the way; warm: containers recreated, the volume kept),
how long a scaled replica takes to serve, and, scaled to 2 decode + 2 prefill replicas,
how long one long prompt and rounds of four concurrent ones take.

    python bench/compose_up.py [--out compose.json] [--engine-env OMP_WAIT_POLICY=ACTIVE]

`--engine-env KEY=VALUE` (repeatable) sets a variable in the prefill and decode
containers (through a compose override file), to compare engine settings.

Needs Docker with Compose v2 (`.ci/run` sets a local engine up on the CI-kind
machine, with RTPLLM_TORCH_INDEX_URL=http://127.0.0.1:8765/simple for the build). Uses
its own compose project and a free host port; takes everything down at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "libs"))

from rtpllm.credentials import new_api_key  # noqa: E402
from rtpllm.runtime.processes import free_port  # noqa: E402

PROJECT = f"rtpllm-bench-{os.getpid()}"
FILES = ["-f", str(ROOT / "docker-compose.yml")]
# Over the gateway's 512-token local-prefill threshold: decode hands them to a prefill replica.
LONG_PROMPT = "tell me about the sea and the sky. " * 90


def compose(*args: str, env: dict[str, str]) -> None:
    cmd = ["docker", "compose", "-p", PROJECT, *FILES, *args]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)


def chat(port: int, api_key: str, content: str, timeout: float = 30) -> None:
    body = json.dumps(
        {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        body,
        {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


def first_answer(port: int, api_key: str, timeout: float = 300) -> float:
    """Seconds until a chat request through the gateway answers 200."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            chat(port, api_key, "Hi")
            return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise TimeoutError("no answer")


def ready_counts(port: int) -> tuple[int, int]:
    """(decode or worker instances, prefill instances) in the gateway's /ready."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, 0
    return int(body.get("workers", 0)), int(body.get("prefill", 0))


def wait_ready(port: int, counts: tuple[int, int], timeout: float = 300) -> None:
    start = time.monotonic()
    while ready_counts(port) != counts:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"the replicas never registered: {ready_counts(port)} != {counts}")
        time.sleep(0.1)


def long_prompt_rounds(port: int, api_key: str, concurrency: int, rounds: int) -> list[float]:
    """Seconds per round of `concurrency` distinct long prompts sent at once."""
    out = []
    for r in range(rounds):
        prompts = [f"Request {r}.{i} at {time.time()}: {LONG_PROMPT}" for i in range(concurrency)]
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda p: chat(port, api_key, p, timeout=300), prompts))
        out.append(round(time.monotonic() - start, 1))
    return out


def engine_override(settings: list[str]) -> Path:
    """A compose override file setting `KEY=VALUE`s in the prefill and decode containers."""
    pairs = dict(item.split("=", 1) for item in settings)
    lines = ["services:"]
    for service in ("prefill", "decode"):
        lines += [f"  {service}:", "    environment:"]
        lines += [f"      {key}: {json.dumps(value)}" for key, value in pairs.items()]
    path = Path(f"/tmp/{PROJECT}-engine-env.yml")
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.engine_env:
        FILES.extend(["-f", str(engine_override(args.engine_env))])
    port = free_port()
    # The secrets service stores this key instead of making one: the client knows it at once.
    env = {**os.environ, "RTPLLM_PORT": str(port), "RTPLLM_API_KEY": new_api_key()}
    result: dict[str, object] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "engine_env": args.engine_env,
    }  # fmt: skip
    try:
        start = time.monotonic()
        compose("build", env=env)
        result["build_s"] = round(time.monotonic() - start, 1)
        size = subprocess.run(["docker", "image", "inspect", "rtpllm:latest", "--format", "{{.Size}}"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        result["image_gb"] = round(int(size) / 1e9, 3)
        for phase in ("cold", "warm"):
            if phase == "cold":
                compose("down", "-v", env=env)
            else:
                compose("down", env=env)  # keeps the model volume
            start = time.monotonic()
            compose("up", "-d", env=env)
            first_answer(port, env["RTPLLM_API_KEY"])
            result[f"{phase}_up_to_first_answer_s"] = round(time.monotonic() - start, 1)
        start = time.monotonic()
        compose("up", "-d", "--no-recreate", "--scale", "decode=2", env=env)
        wait_ready(port, (2, 1))
        result["scaled_replica_ready_s"] = round(time.monotonic() - start, 1)
        compose("up", "-d", "--no-recreate", "--scale", "decode=2", "--scale", "prefill=2", env=env)
        wait_ready(port, (2, 2))
        result["one_long_prompt_s"] = long_prompt_rounds(port, env["RTPLLM_API_KEY"], 1, args.rounds)
        result["four_long_prompts_s"] = long_prompt_rounds(port, env["RTPLLM_API_KEY"], 4, args.rounds)
    finally:
        compose("down", "-v", env=env)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
