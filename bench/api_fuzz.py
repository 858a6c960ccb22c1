"""Fuzz the gateway's OpenAPI schema with schemathesis: no generated request may get a
5xx, and the stack must still be healthy afterwards.

    python bench/api_fuzz.py [--max-examples 1000] [--out fuzz.json]

Starts a whole stack on loopback (nats, redis, a worker on a tiny random-weight model,
the gateway, with an API key), writes the gateway's /openapi.json to a file and runs
`schemathesis run` on it against the gateway: every operation, positive and negative
generation modes, the `not_a_server_error` check. Then asks /ready and sends a normal
chat request. tests/integration/test_api_fuzz.py runs a short version of this in CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "libs"))

import httpx  # noqa: E402

from rtpllm.loader.random_checkpoint import write_random_checkpoint  # noqa: E402
from rtpllm.runtime.stack import Stack, StackConfig  # noqa: E402


def fuzz(stack: Stack, max_examples: int, workdir: Path, seed: int = 1, max_time_s: float | None = None) -> dict:
    """Run schemathesis against the stack's gateway; the summary as a dict."""
    schema = httpx.get(f"{stack.url}/openapi.json", headers=stack.auth_headers, timeout=10).json()
    schema_path = workdir / "openapi.json"
    schema_path.write_text(json.dumps(schema))
    ndjson = workdir / "events.ndjson"
    # One worker: schemathesis' generation in threads hits a CPython 3.11 `ast` bug
    # ("AST constructor recursion depth mismatch") in hypothesis' reprs.
    argv = [
        sys.executable, "-m", "schemathesis.cli", "run", str(schema_path), "--url", stack.url,
        "--header", f"Authorization: Bearer {stack.api_key}", "--checks", "not_a_server_error",
        "--max-examples", str(max_examples), "--seed", str(seed), "--workers", "1", "--request-timeout", "30",
        "--phases", "examples,coverage,fuzzing", "--no-shrink", "--suppress-health-check", "all",
        "--report", "ndjson", "--report-ndjson-path", str(ndjson),
    ]  # fmt: skip
    if max_time_s:
        argv += ["--max-time", str(max_time_s)]
    start = time.monotonic()
    run = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    elapsed = time.monotonic() - start
    statuses: dict[str, int] = {}
    for line in ndjson.read_text().splitlines() if ndjson.exists() else []:
        for status in _statuses(json.loads(line)):
            statuses[str(status)] = statuses.get(str(status), 0) + 1
    server_errors = sum(n for s, n in statuses.items() if s.startswith("5"))
    return {
        "exit_code": run.returncode,
        "seconds": round(elapsed, 1),
        "requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": server_errors,
        "summary": run.stdout[-2500:],
    }


def _statuses(event: object):  # noqa: ANN202 - walks one NDJSON event for response status codes
    """Every `status_code` of a response inside one schemathesis NDJSON event."""
    if isinstance(event, dict):
        response = event.get("response")
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            yield response["status_code"]
        for key, value in event.items():
            if key != "response":
                yield from _statuses(value)
    elif isinstance(event, list):
        for item in event:
            yield from _statuses(item)


def healthy_after(stack: Stack) -> bool:
    ready = httpx.get(f"{stack.url}/ready", timeout=10).status_code == 200
    body = {"model": stack.config.served_model_name or Path(stack.config.model).name,
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}  # fmt: skip
    chat = httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=stack.auth_headers, timeout=60)
    return ready and chat.status_code == 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=1000, help="per operation and phase")
    parser.add_argument("--max-time", type=float, help="seconds for the whole schemathesis run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rtpllm-fuzz-"))
    model = write_random_checkpoint(tmp / "tiny-llama", "llama")
    (tmp / "logs").mkdir()
    stack = Stack(StackConfig(model=str(model), workers=1, log_dir=tmp / "logs",
                              worker_args=["--num-blocks", "512", "--max-num-seqs", "64"]))  # fmt: skip
    try:
        stack.start()
        stack.wait_ready(timeout=120)
        result = fuzz(stack, args.max_examples, tmp, args.seed, args.max_time)
        result["healthy_after"] = healthy_after(stack)
        result["workers_alive"] = all(p.alive for p in stack.workers) and stack.gateway is not None and stack.gateway.alive
    finally:
        stack.stop()
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "args": vars(args) | {"out": str(args.out)}, **result}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["summary"])
    print(json.dumps({k: result[k] for k in ("requests", "statuses", "server_errors", "healthy_after", "workers_alive", "seconds")}))
    ok = result["server_errors"] == 0 and result["healthy_after"] and result["workers_alive"] and result["requests"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
