"""What the serving path costs: a zero-compute engine behind the real gateway and NATS.

    python bench/serving_overhead.py                      # 1, 64 and 256 streams
    python bench/serving_overhead.py --concurrency 64 --out overhead.json

Processes: nats-server, one worker process running the engine server around
`SyntheticEngine` (emits tokens without a model), the gateway (`rtpllm serve gateway`),
and this script as the client (httpx, raw SSE). All on one machine, sharing its cores.

Two measurements per concurrency level:

- throughput: the engine steps as fast as it can; streamed tokens/s counted at the client.
- latency: the engine steps every --step-ms; each token's text is the wall-clock time the
  engine emitted it, so the client gets, per token, the delivery latency (arrival -
  emission) and the *added inter-token latency*: (gap between arrivals) - (gap between
  emissions), i.e. how much the serving path stretches or squeezes the engine's cadence.

Target (issue 3): >= 10,000 streamed tokens/s and p99 added ITL <= 5 ms at 64 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from rtpllm.runtime.processes import (
    ManagedProcess,
    free_port,
    http_json,
    rtpllm_command,
    start_nats,
    wait_until,
)

MODEL = "synthetic"


# -- the worker role (a child process of this script) ----------------------------------


async def run_worker(nats_url: str, step_ms: float, stamp: bool) -> None:
    import signal

    from rtpllm.serving.bus import connect_nats
    from rtpllm.serving.engine_info import EngineInfo
    from rtpllm.serving.engine_server import EngineServer, EngineServerConfig
    from rtpllm.serving.synthetic_engine import SyntheticEngine

    info = EngineInfo(
        model=MODEL, max_model_len=1 << 16, vocab_size=320, max_num_seqs=4096, block_size=16, kv_namespace=b""
    )
    engine = SyntheticEngine(step_ms / 1000, info, stamp_text=stamp)
    nc = await connect_nats(nats_url, "bench-worker")
    server = EngineServer(nc, engine, info, EngineServerConfig(instance_id=f"synthetic-{os.getpid()}"))
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("worker ready", flush=True)
    await stop.wait()
    await server.drain(0)
    await nc.close()


# -- the client --------------------------------------------------------------------------


_CONTENT = '"delta":{"content":"'


async def one_stream(
    client: httpx.AsyncClient, url: str, tokens: int, arrivals: list[tuple[float, str]] | None
) -> int:
    """Stream one chat completion; count content chunks (and record their arrival time
    and text). Parsed by string search, not JSON: the client shares the 2 cores with
    the system under test and must stay cheap."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "stream": True,
    }
    count = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            start = line.find(_CONTENT)
            if start < 0:
                continue
            count += 1
            if arrivals is not None:
                start += len(_CONTENT)
                arrivals.append((time.time(), line[start : line.index('"', start)]))
    return count


async def run_load(
    url: str, concurrency: int, tokens: int, record: bool
) -> tuple[float, int, list[list[tuple[float, str]]]]:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    per_stream: list[list[tuple[float, str]]] = [[] for _ in range(concurrency)]
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        await one_stream(client, url, 4, None)  # warm-up: connection, routing
        t0 = time.perf_counter()
        counts = await asyncio.gather(
            *(one_stream(client, url, tokens, per_stream[i] if record else None) for i in range(concurrency))
        )
        elapsed = time.perf_counter() - t0
    return elapsed, sum(counts), per_stream


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_stats(per_stream: list[list[tuple[float, str]]]) -> dict[str, float]:
    delivery: list[float] = []
    added: list[float] = []
    for arrivals in per_stream:
        stamps = []
        for arrived, text in arrivals:
            for part in text.split():  # a chunk may carry several coalesced tokens
                stamps.append((arrived, float(part)))
        for i, (arrived, emitted) in enumerate(stamps):
            delivery.append(arrived - emitted)
            if i:
                added.append((arrived - stamps[i - 1][0]) - (emitted - stamps[i - 1][1]))
    ms = 1000.0
    return {
        "delivery_p50_ms": pct(delivery, 0.5) * ms,
        "delivery_p99_ms": pct(delivery, 0.99) * ms,
        "added_itl_p50_ms": pct(added, 0.5) * ms,
        "added_itl_p99_ms": pct(added, 0.99) * ms,
        "added_itl_mean_ms": statistics.fmean(added) * ms if added else float("nan"),
    }


# -- orchestration -----------------------------------------------------------------------


class Rig:
    """nats-server + gateway, with a worker that can be restarted in another mode."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.nats, self.nats_url = start_nats(log_path=log_dir / "nats.log")
        tok_dir = log_dir / "tokenizer"
        tok_dir.mkdir(exist_ok=True)
        from rtpllm.tokenizer.byte_tokenizer import write_byte_tokenizer

        write_byte_tokenizer(tok_dir, 320)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = rtpllm_command(
            "serve", "gateway", "--nats", self.nats_url, "--model", str(tok_dir), "--served-model-name", MODEL,
            "--port", str(self.port), "--log-level", "warning", "--max-running", "4096",
        )  # fmt: skip
        self.gateway = ManagedProcess("gateway", argv, log_path=log_dir / "gateway.log").start()
        self.worker: ManagedProcess | None = None

    def start_worker(self, step_ms: float, stamp: bool) -> None:
        if self.worker is not None:
            self.worker.stop(5)
            wait_until(
                lambda: (http_json(f"{self.url}/ready")[1] or {}).get("workers", 1) == 0,
                10,
                "old worker to leave",
            )
        argv = [
            sys.executable,
            __file__,
            "--role",
            "worker",
            "--nats",
            self.nats_url,
            "--step-ms",
            str(step_ms),
        ]
        if stamp:
            argv.append("--stamp")
        self.worker = ManagedProcess("worker", argv, log_path=self.log_dir / "worker.log").start()
        wait_until(
            lambda: (http_json(f"{self.url}/ready")[1] or {}).get("workers", 0) == 1,
            30,
            "worker",
            [self.worker, self.gateway],
        )

    def cpu(self) -> dict[str, float]:
        procs = {"gateway": self.gateway, "worker": self.worker, "nats": self.nats}
        out = {name: cpu_seconds(p.pid) for name, p in procs.items() if p is not None and p.alive}
        out["client"] = time.process_time()
        return out

    def stop(self) -> None:
        for proc in (self.gateway, self.worker, self.nats):
            if proc is not None:
                proc.stop(5)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--role", choices=["bench", "worker"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--nats", help=argparse.SUPPRESS)
    parser.add_argument("--stamp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument(
        "--total-tokens", type=int, default=40_000, help="tokens per throughput run (split over the streams)"
    )
    parser.add_argument("--step-ms", type=float, default=20.0, help="engine step of the latency runs")
    parser.add_argument(
        "--latency-tokens", type=int, default=100, help="tokens per stream in the latency runs"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.role == "worker":
        asyncio.run(run_worker(args.nats, args.step_ms, args.stamp))
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="rtpllm-bench-") as tmp:
        rig = Rig(Path(tmp))
        try:
            wait_until(lambda: http_json(f"{rig.url}/health")[0] == 200, 30, "gateway", [rig.gateway])
            rig.start_worker(0.0, stamp=False)
            for c in args.concurrency:
                tokens = max(16, args.total_tokens // c)
                before = rig.cpu()
                elapsed, count, _ = asyncio.run(run_load(rig.url, c, tokens, record=False))
                after = rig.cpu()
                # CPU microseconds per streamed token, by process: where the time goes.
                cpu_us = {k: (after[k] - before[k]) / count * 1e6 for k in after if k in before}
                row = {
                    "concurrency": c, "tokens_per_stream": tokens, "streamed_tokens": count, "seconds": elapsed,
                    "tokens_per_s": count / elapsed, "cpu_us_per_token": cpu_us,
                }  # fmt: skip
                results.append(row)
                shares = ", ".join(f"{k} {v:.0f}" for k, v in cpu_us.items())
                print(
                    f"throughput  {c:4d} streams: {count / elapsed:9.0f} tok/s  ({count} tokens in {elapsed:.2f} s; CPU us/token: {shares})",
                    flush=True,
                )
            rig.start_worker(args.step_ms, stamp=True)
            for row in results:
                c = row["concurrency"]
                elapsed, count, per_stream = asyncio.run(
                    run_load(rig.url, c, args.latency_tokens, record=True)
                )
                stats = latency_stats(per_stream)
                row.update(
                    {"latency_step_ms": args.step_ms, "latency_tokens_per_s": count / elapsed, **stats}
                )
                print(
                    f"latency     {c:4d} streams @ {args.step_ms:g} ms/step: added ITL p50 {stats['added_itl_p50_ms']:.2f} ms, "
                    f"p99 {stats['added_itl_p99_ms']:.2f} ms; delivery p50 {stats['delivery_p50_ms']:.2f} ms, "
                    f"p99 {stats['delivery_p99_ms']:.2f} ms ({count / elapsed:.0f} tok/s)",
                    flush=True,
                )
        finally:
            rig.stop()
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(sys.argv),
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
