"""Chaos: mixed load on a whole stack while its processes are killed and frozen at random.

    python bench/chaos.py --minutes 10 [--concurrency 8] [--seed 1] [--out chaos.json]

The stack (loopback only): nats-server, redis-server, the kvstore (host tier + Redis),
one prefill and two decode instances, one aggregated worker and the gateway, serving a
tiny random-weight Llama by default (`--model` for another). Clients stream chat
requests and send completions, short and long (long ones are handed to the prefill
instance). Every `--fault-every` seconds (jittered) one victim is picked among the
workers, prefill, decode, kvstore, Redis and NATS, and either SIGKILLed (then started
again, as a supervisor would) or SIGSTOPped for 1-6 s and SIGCONTed. The gateway is
the observation point and is left alone.

Reported: requests sent, completed, failed with a clear error (an HTTP error in OpenAI's
format, or an error event in the stream), hung (no end within --request-timeout: must
be 0), other failures (must be 0), and KV blocks still held on the surviving instances
once the load has stopped and the stack settled (must be 0). Bounded in time
(`--minutes`) and count (`--max-requests`). Exit status 1 when a must-be-0 is not 0.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "libs"))

import httpx  # noqa: E402

from rtpllm.loader.random_checkpoint import write_random_checkpoint  # noqa: E402
from rtpllm.runtime.processes import ManagedProcess, start_nats, start_redis  # noqa: E402
from rtpllm.runtime.stack import Stack, StackConfig  # noqa: E402

ENGINE_ARGS = ["--num-blocks", "512", "--max-num-seqs", "64", "--drain-timeout", "2", "--kvstore", "--kv-host-gib", "0.05"]
VICTIMS = ("worker", "prefill", "decode", "kvstore", "redis", "nats")


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    failed_clear: int = 0
    hung: int = 0
    other: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    faults: list[dict] = field(default_factory=list)
    hangs: list[dict] = field(default_factory=list)  # when each hung request started, to match with faults


class Chaos:
    def __init__(self, stack: Stack, rng: random.Random, tally: Tally, victims: tuple[str, ...] = VICTIMS) -> None:
        self.stack, self.rng, self.tally, self.victims = stack, rng, tally, victims

    def _engines(self, role: str) -> list[ManagedProcess]:
        return [p for p in self.stack.workers if p.name.startswith(f"{role}-") and p.alive]

    def _restart(self, victim: str, proc: ManagedProcess) -> None:
        s = self.stack
        if victim in ("worker", "prefill", "decode"):
            s.workers.remove(proc)
            s.add_worker(role=victim)
        elif victim == "kvstore":
            s.start_kvstore()
        elif victim == "redis":
            port = urlparse(s.redis_url).port
            s.redis, _ = start_redis(port, password=s.redis_password, log_path=s._log("redis-restarted"))
        elif victim == "nats":
            port = urlparse(s.nats_url).port
            s.nats, _ = start_nats(port, token=s.nats_token, log_path=s._log("nats-restarted"))

    async def one_fault(self) -> None:
        victim = self.rng.choice(self.victims)
        if victim in ("worker", "prefill", "decode"):
            alive = self._engines(victim)
            if not alive:
                return
            proc = self.rng.choice(alive)
        else:
            proc = {"kvstore": self.stack.kvstore, "redis": self.stack.redis, "nats": self.stack.nats}[victim]
            if proc is None or not proc.alive:
                return
        action = self.rng.choice(("kill", "stop"))
        record = {"t": round(time.monotonic() - START, 1), "victim": proc.name, "action": action}
        if action == "kill":
            proc.signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
            await asyncio.sleep(self.rng.uniform(0.5, 3.0))  # a supervisor's restart delay
            await asyncio.to_thread(self._restart, victim, proc)
        else:
            seconds = self.rng.uniform(1.0, 6.0)
            record["seconds"] = round(seconds, 1)
            proc.signal(signal.SIGSTOP)
            await asyncio.sleep(seconds)
            proc.signal(signal.SIGCONT)
        self.tally.faults.append(record)
        print(f"[{record['t']:7.1f}s] {action} {proc.name}" + (f" for {record['seconds']} s" if action == "stop" else ""), flush=True)


START = time.monotonic()


async def client_loop(url: str, headers: dict[str, str], model: str, rng: random.Random, tally: Tally,
                      deadline: float, max_requests: int, timeout_s: float) -> None:  # fmt: skip
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(timeout_s)) as client:
        while time.monotonic() < deadline and tally.sent < max_requests:
            tally.sent += 1
            long = rng.random() < 0.25
            prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(600, 900) if long else rng.randrange(8, 64))]
            body = {"model": model, "prompt": prompt, "max_tokens": rng.randrange(4, 48), "temperature": 0.7,
                    "seed": rng.randrange(1 << 30), "ignore_eos": True}  # fmt: skip
            stream = rng.random() < 0.6
            body["stream"] = stream
            started = round(time.monotonic() - START, 1)
            try:
                outcome = await asyncio.wait_for(_one(client, body, stream), timeout_s)
            except TimeoutError:
                outcome = "hung"
            except (httpx.TransportError, httpx.HTTPError) as exc:
                outcome = f"other: {type(exc).__name__}"
            if outcome == "ok":
                tally.completed += 1
            elif outcome == "hung":
                tally.hung += 1
                tally.hangs.append({"started": started, "stream": stream, "prompt_tokens": len(prompt)})
            elif outcome.startswith("clear:"):
                tally.failed_clear += 1
                tally.errors[outcome] += 1
            else:
                tally.other += 1
                tally.errors[outcome] += 1
            if outcome != "ok":
                await asyncio.sleep(0.2)  # as a client honouring Retry-After would


async def _one(client: httpx.AsyncClient, body: dict, stream: bool) -> str:
    """'ok', 'clear: <code>' for an OpenAI-format error, or 'other: ...'."""
    if not stream:
        response = await client.post("/v1/completions", json=body)
        if response.status_code == 200:
            return "ok" if response.json()["choices"][0]["finish_reason"] else "other: no finish_reason"
        return _classify_error(response.status_code, response.content)
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return _classify_error(response.status_code, await response.aread())
        finished = False
        async for line in _sse_lines(response):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return f"clear: {chunk['error'].get('code') or chunk['error'].get('type')}"
            if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                finished = True
        return "ok" if finished else "other: stream ended without finish_reason or error"


async def _sse_lines(response: httpx.Response):  # noqa: ANN202 - an async generator of bytes
    """SSE lines, split on LF only, as the SSE spec says (httpx's aiter_lines would also
    split inside a JSON string at U+2028 and friends, which generated text can hold)."""
    buffer = b""
    async for data in response.aiter_bytes():
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")


def _classify_error(status: int, content: bytes) -> str:
    try:
        error = json.loads(content)["error"]
        return f"clear: {status} {error.get('code') or error.get('type')}"
    except (ValueError, KeyError, TypeError):
        return f"other: HTTP {status} without an OpenAI error body"


def held_blocks(stack: Stack) -> dict[str, dict]:
    items = httpx.get(f"{stack.url}/instances", headers=stack.auth_headers, timeout=5).json()["instances"]
    return {
        i["instance_id"]: {
            "held": i["load"]["num_blocks"] - i["load"]["num_free_blocks"],
            "running": i["load"]["num_running"] + i["load"]["num_waiting"],
            "awaiting_kv": i["load"]["num_awaiting_kv"],
            "held_for_transfer": i["load"]["num_held_kv"],
        }
        for i in items
    }


async def run(args: argparse.Namespace, stack: Stack, model: str) -> dict:
    rng = random.Random(args.seed)
    tally = Tally()
    chaos = Chaos(stack, rng, tally, tuple(args.victims.split(",")))
    deadline = time.monotonic() + args.minutes * 60
    clients = [
        asyncio.create_task(client_loop(stack.url, stack.auth_headers, model, random.Random(rng.random()), tally,
                                        deadline, args.max_requests, args.request_timeout))  # fmt: skip
        for _ in range(args.concurrency)
    ]
    while time.monotonic() < deadline - args.fault_every and not all(c.done() for c in clients):
        await asyncio.sleep(args.fault_every * rng.uniform(0.5, 1.5))
        await chaos.one_fault()
    await asyncio.gather(*clients)
    # Settle: leases run out, drains finish, restarted instances register.
    settle_until = time.monotonic() + args.settle
    leaks = await asyncio.to_thread(held_blocks, stack)
    while time.monotonic() < settle_until and any(v["held"] or v["running"] or v["awaiting_kv"] or v["held_for_transfer"] for v in leaks.values()):
        await asyncio.sleep(1.0)
        leaks = await asyncio.to_thread(held_blocks, stack)
    return {
        "sent": tally.sent, "completed": tally.completed, "failed_clear": tally.failed_clear,
        "hung": tally.hung, "other_failures": tally.other,
        "leaked_blocks": sum(v["held"] for v in leaks.values()),
        "stuck_requests": sum(v["running"] + v["awaiting_kv"] + v["held_for_transfer"] for v in leaks.values()),
        "instances_after": leaks, "errors": dict(tally.errors.most_common()), "faults": tally.faults,
        "hangs": tally.hangs,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--fault-every", type=float, default=8.0, help="mean seconds between faults")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="a request not ended by then is hung")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait for the stack to settle after the load")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--victims", default=",".join(VICTIMS), help=f"comma-separated, from {','.join(VICTIMS)}")
    parser.add_argument("--model", help="an HF-format model directory (default: a tiny random Llama)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--log-dir", type=Path)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rtpllm-chaos-"))
    model_dir = Path(args.model) if args.model else write_random_checkpoint(tmp / "tiny-llama", "llama")
    log_dir = args.log_dir or tmp / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(
        StackConfig(
            model=str(model_dir), prefill=1, decode=2, kvstore=True, kvstore_args=["--kv-host-gib", "0.1", "--kv-redis"],
            worker_args=ENGINE_ARGS, decode_args=["--kv-lease", "10"], log_dir=log_dir,
        )
    )  # fmt: skip
    try:
        stack.start()
        stack.add_worker(role="worker")  # an aggregated worker beside the split
        stack.wait_ready(timeout=120, workers=3)
        served = model_dir.name
        print(f"stack ready at {stack.url} (logs in {log_dir}); chaos for {args.minutes} min", flush=True)
        result = asyncio.run(run(args, stack, served))
    finally:
        stack.stop()
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{os.uname().nodename}, {os.cpu_count()} cores",
        "args": {k: str(v) for k, v in vars(args).items()},
        **result,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    faults = Counter(f"{f['action']} {f['victim'].split('-')[0]}" for f in result["faults"])
    print(json.dumps({k: result[k] for k in ("sent", "completed", "failed_clear", "hung", "other_failures", "leaked_blocks", "stuck_requests")}))
    print("faults:", dict(faults))
    print("errors:", result["errors"])
    if result["hangs"]:
        print("hung requests started at:", result["hangs"])
    bad = result["hung"] or result["other_failures"] or result["leaked_blocks"] or result["stuck_requests"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
