"""`docker compose up` as a user meets it: image size, time to the first answer (cold:
a new model volume, converted on the way; warm: containers recreated, the volume kept),
and how long a scaled replica takes to serve.

    python bench/compose_up.py [--out compose.json]

Needs Docker with Compose v2 (`.ci/run` sets a local engine up on the CI-kind
machine, with RTPLLM_TORCH_INDEX_URL=http://127.0.0.1:8765/simple for the build). Uses
its own compose project and a free host port; takes everything down at the end.
"""

from __future__ import annotations

import argparse
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


def compose(*args: str, env: dict[str, str]) -> None:
    cmd = ["docker", "compose", "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), *args]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)


def first_answer(port: int, api_key: str, timeout: float = 300) -> float:
    """Seconds until a chat request through the gateway answers 200."""
    body = json.dumps(
        {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    ).encode()
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            body,
            {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise TimeoutError("no answer")


def decode_count(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as response:
            return int(json.loads(response.read())["workers"])
    except urllib.error.HTTPError as exc:
        return int(json.loads(exc.read() or b"{}").get("workers", 0))
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    port = free_port()
    # The secrets service stores this key instead of making one: the client knows it at once.
    env = {**os.environ, "RTPLLM_PORT": str(port), "RTPLLM_API_KEY": new_api_key()}
    result: dict[str, object] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
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
        while decode_count(port) < 2:
            if time.monotonic() - start > 300:
                raise TimeoutError("the second decode replica never registered")
            time.sleep(0.1)
        result["scaled_replica_ready_s"] = round(time.monotonic() - start, 1)
    finally:
        compose("down", "-v", env=env)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
