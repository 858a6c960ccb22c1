"""Decode inter-token latency while long prompts arrive (issue 5): combined workers vs
prefill/decode disaggregation, on two GPUs, Llama-3.1-8B shape, random weights.

    python bench/pd_interference.py --json pd.json --log-dir pd-logs    # 2 GPUs, ~10 min
    python bench/pd_interference.py --smoke                             # CPU check of the script

Two topologies, started one after the other as stacks of real processes (NATS, Redis,
engines, gateway: `rtpllm.runtime.stack`), each engine alone on its GPU
(CUDA_VISIBLE_DEVICES):

  aggregated     one combined worker per GPU (2 workers behind the gateway)
  disaggregated  a prefill instance on GPU 0, a decode instance on GPU 1; the decode
                 instance prefills prompts under --local-prefill-below itself, so the
                 decode streams' short prompts stay there and the long prompts go remote

and each measured twice, with the same client load in both topologies:

  baseline       --streams concurrent decode streams (--prompt-len random tokens in,
                 --decode-tokens out, ignore_eos); a new one starts when one ends
  +long prompts  the same streams while long prompts arrive (Poisson or fixed rate
                 --prefill-rate per second, lengths uniform in --long-len, max_tokens 1;
                 disaggregated, such a request ends at the prefill instance's first
                 token and ships no KV: --long-max-tokens 2 measures the transfer too)

The client (this process) streams /v1/completions with token-id prompts over httpx and
stamps each SSE chunk as it arrives. ITL = the gaps between consecutive content chunks
of one stream (its first chunk is its TTFT), counted when both ends fall inside the
--duration window; long-prompt TTFT = first chunk - send time. Before measuring, each
stack serves a few requests of each kind (the first ones compile Triton kernels).

Target (issue 5): disaggregated p99 ITL <= 1.2x its own baseline (decode instance
without long prompts); the aggregated ratio from the same run is printed next to it.
Engine logs go to --log-dir/<topology>/ (default: a temporary directory, kept).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from serving_bench import (
    StreamLog,
    completion_body,
    new_client,
    pct,
    raise_interrupt,
    redis_installed,
    stream_request,
    strict_json,
)

from rtpllm.loader.random_checkpoint import LLAMA_3_1_8B_SHAPE, TINY_SHAPE, make_config
from rtpllm.runtime.stack import Stack, StackConfig
from rtpllm.tokenizer.byte_tokenizer import write_byte_tokenizer

TARGET_RATIO = 1.2
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama8b": ("llama-3.1-8b-random", LLAMA_3_1_8B_SHAPE),
    "tiny": ("tiny-llama-random", TINY_SHAPE),
}
# Engine flags of every engine process (workers, prefill and decode instances); later
# flags win, so --engine-args overrides any of them.
GPU_ENGINE_ARGS = (
    "--device cuda --load-format dummy --max-model-len 10240 --gpu-memory-utilization 0.85 "
    "--max-num-batched-tokens 8192 --drain-timeout 5"
)
CPU_ENGINE_ARGS = (
    "--device cpu --load-format dummy --max-model-len 1024 --num-blocks 1024 "
    "--max-num-batched-tokens 128 --drain-timeout 5"
)
# Defaults of the load flags: the run, and --smoke (seconds on a CPU).
PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "shape": "llama8b", "gpus": "0,1", "streams": 32, "prompt_len": 128, "decode_tokens": 512,
        "duration": 60.0, "settle": 5.0, "prefill_rate": 1.0, "long_len": "4096-8192",
        "local_prefill_below": 1024, "ready_timeout": 900.0,
    },
    "smoke": {
        "shape": "tiny", "gpus": "", "streams": 2, "prompt_len": 16, "decode_tokens": 16,
        "duration": 2.5, "settle": 0.5, "prefill_rate": 2.0, "long_len": "100-200",
        "local_prefill_below": 64, "ready_timeout": 120.0,
    },
}  # fmt: skip
TOPOLOGIES = ("aggregated", "disaggregated")
PHASES = ("baseline", "long")


@dataclass(frozen=True)
class Load:
    """The client load of one phase (the same in every topology)."""

    streams: int
    prompt_len: int
    decode_tokens: int
    duration: float
    settle: float  # seconds the streams run before the window opens
    prefill_rate: float  # long prompts per second (all engines together)
    long_min: int
    long_max: int
    arrivals: str  # "poisson" or "fixed"
    long_max_tokens: int
    seed: int
    vocab: int


@dataclass
class PhaseLogs:
    window: tuple[float, float]
    streams: list[StreamLog]
    longs: list[StreamLog]


# -- the model directory -------------------------------------------------------------------


def write_model_dir(out: Path, shape: str) -> Path:
    """config.json of the shape, a byte tokenizer over its vocabulary, no weights: the
    engines run with --load-format dummy (random weights drawn on the device)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config("llama", **SHAPES[shape][1])
    cfg["torch_dtype"] = "bfloat16" if shape != "tiny" else "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_byte_tokenizer(out, cfg["vocab_size"])
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg["eos_token_id"]}))
    return out


# -- the client ------------------------------------------------------------------------------

def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(length)]


def long_schedule(load: Load, model: str, key: str) -> tuple[list[float], list[bytes]]:
    """Arrival offsets within the window and request bodies of the long prompts, seeded
    (the same in both topologies) and encoded before the clock starts."""
    rng = random.Random(f"{load.seed}-{key}")
    offsets: list[float] = []
    t = rng.expovariate(load.prefill_rate) if load.arrivals == "poisson" else 0.0
    while load.prefill_rate > 0 and t < load.duration:
        offsets.append(t)
        t += rng.expovariate(load.prefill_rate) if load.arrivals == "poisson" else 1.0 / load.prefill_rate
    bodies = [
        completion_body(
            model,
            random_prompt(rng, rng.randint(load.long_min, load.long_max), load.vocab),
            load.long_max_tokens,
        )
        for _ in offsets
    ]
    return offsets, bodies


async def run_phase(url: str, model: str, load: Load, phase: str) -> PhaseLogs:
    """Decode streams for settle + duration seconds (and long prompts arriving within
    the window if phase == "long"); streams still running at the end are cancelled,
    long prompts are waited for (their TTFT counts)."""
    completions = f"{url}/v1/completions"
    offsets, long_bodies = long_schedule(load, model, "long") if phase == "long" else ([], [])
    streams: list[StreamLog] = []
    longs: list[StreamLog] = []
    start = time.perf_counter()
    window = (start + load.settle, start + load.settle + load.duration)
    async with new_client() as client:

        async def slot(i: int) -> None:
            # Prompts differ per phase (baseline and long run on the same engines: no
            # prefix-cache hits) but not per topology.
            rng = random.Random(f"{load.seed}-{phase}-stream-{i}")
            # Slot i's first stream is shorter, so streams end (and the next one's prompt
            # is prefilled) spread over time instead of all restarting in lockstep.
            max_tokens = max(1, load.decode_tokens * (i + 1) // load.streams)
            while time.perf_counter() < window[1]:
                log = StreamLog(time.perf_counter())
                streams.append(log)
                body = completion_body(model, random_prompt(rng, load.prompt_len, load.vocab), max_tokens)
                await stream_request(client, completions, body, log)
                if log.error:
                    await asyncio.sleep(0.2)  # no busy loop against a failing stack
                max_tokens = load.decode_tokens

        async def arrivals() -> None:
            tasks = []
            for offset, body in zip(offsets, long_bodies, strict=True):
                await asyncio.sleep(max(0.0, window[0] + offset - time.perf_counter()))
                log = StreamLog(time.perf_counter())
                longs.append(log)
                tasks.append(asyncio.create_task(stream_request(client, completions, body, log)))
            await asyncio.gather(*tasks)

        slots = [asyncio.create_task(slot(i)) for i in range(load.streams)]
        arriving = asyncio.create_task(arrivals())
        try:
            await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
        finally:
            for task in slots:
                task.cancel()
            await asyncio.gather(*slots, return_exceptions=True)
        await arriving
    return PhaseLogs(window, streams, longs)


async def warm_up(url: str, model: str, load: Load, engines: int, rounds: int = 2) -> None:
    """Serve each kind of request a few times, long prompts joining running decodes (the
    first requests compile Triton kernels: prefill chunk shapes, mixed batches)."""
    rng = random.Random(f"{load.seed}-warmup")
    completions = f"{url}/v1/completions"
    async with new_client() as client:
        for _ in range(rounds):
            n_short = max(2, min(load.streams, 8))
            bodies = [
                completion_body(model, random_prompt(rng, load.prompt_len, load.vocab), min(load.decode_tokens, 32))
                for _ in range(n_short)
            ] + [
                completion_body(model, random_prompt(rng, n, load.vocab), load.long_max_tokens)
                for n in [load.long_max, load.long_min] * engines
            ]  # fmt: skip
            logs: list[StreamLog] = []
            tasks = []
            for i, body in enumerate(bodies):
                if i == n_short:
                    await asyncio.sleep(0.2)  # the short ones are decoding when the long ones arrive
                logs.append(StreamLog(time.perf_counter()))
                tasks.append(asyncio.create_task(stream_request(client, completions, body, logs[-1])))
            await asyncio.gather(*tasks)
            errors = [log.error for log in logs if log.error]
            if errors:
                raise RuntimeError(
                    f"warm-up: {len(errors)} of {len(logs)} requests failed, first: {errors[0]}"
                )


# -- the stack's own view --------------------------------------------------------------------


async def instances(client: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    r = await client.get(f"{url}/instances", timeout=10)
    r.raise_for_status()
    return r.json()["instances"]


async def wait_idle(url: str, timeout: float = 180.0) -> list[dict[str, Any]]:
    """Until every instance reports nothing running, waiting, in flight, held or awaiting
    KV; returns the instances (with their counters) as then."""
    async with new_client() as client:
        await asyncio.sleep(1.5)  # heartbeats (1 s apart) must postdate the phase's end
        deadline = time.monotonic() + timeout
        busy = ("num_running", "num_waiting", "num_inflight", "num_held_kv", "num_awaiting_kv")
        while True:
            items = await instances(client, url)
            if all(not any(i["load"].get(k) for k in busy) for i in items):
                return items
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"instances still busy after {timeout:.0f} s: {[i['load'] for i in items]}"
                )
            await asyncio.sleep(0.5)


def counters(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Cumulative counters summed over the instances: prefills by kind, KV transfers by
    backend, preemptions."""
    out: dict[str, Any] = {
        "local_prefills": 0,
        "remote_prefills": 0,
        "remote_fallbacks": 0,
        "preemptions": 0,
        "transfers": {},
    }
    for item in items:
        out["preemptions"] += item["load"].get("num_preemptions", 0)
        disagg = item.get("disaggregation") or {}
        if item["role"] != "decode":
            continue  # the decode side counts prefills and receives every transfer once
        for key in ("local_prefills", "remote_prefills", "remote_fallbacks"):
            out[key] += disagg.get(key, 0)
        for backend, c in (disagg.get("transfers") or {}).items():
            acc = out["transfers"].setdefault(
                backend, {"transfers": 0, "failures": 0, "bytes": 0, "seconds": 0.0}
            )
            for k in acc:
                acc[k] += c.get(k, 0)
    return out


def counters_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out = {k: after[k] - before[k] for k in after if k != "transfers"}
    out["transfers"] = {
        backend: {k: v - before["transfers"].get(backend, {}).get(k, 0) for k, v in c.items()}
        for backend, c in after["transfers"].items()
    }
    return out


# -- statistics ------------------------------------------------------------------------------


def summarize(topology: str, phase: str, logs: PhaseLogs, load: Load) -> dict[str, Any]:
    lo, hi = logs.window
    gaps = [
        b - a
        for s in logs.streams
        for a, b in itertools.pairwise(s.chunks)  # chunk 0 is the TTFT: gaps start after it
        if a >= lo and b <= hi
    ]
    tokens = sum(1 for s in logs.streams for t in s.chunks if lo <= t <= hi)
    stream_ttft = [s.chunks[0] - s.sent for s in logs.streams if s.chunks and lo <= s.sent <= hi]
    long_ttft = [s.chunks[0] - s.sent for s in logs.longs if s.chunks]
    errors = [s.error for s in logs.streams + logs.longs if s.error]
    ms = 1e3
    return {
        "topology": topology,
        "phase": phase,
        "itl_p50_ms": pct(gaps, 0.5) * ms,
        "itl_p90_ms": pct(gaps, 0.9) * ms,
        "itl_p99_ms": pct(gaps, 0.99) * ms,
        "itl_max_ms": max(gaps, default=float("nan")) * ms,
        "itl_gaps": len(gaps),
        "stream_ttft_p50_ms": pct(stream_ttft, 0.5) * ms,
        "stream_ttft_p99_ms": pct(stream_ttft, 0.99) * ms,
        "decode_tokens_per_s": tokens / load.duration,
        "streams_completed": sum(1 for s in logs.streams if s.finished and lo <= s.chunks[-1] <= hi),
        "stream_errors": sum(1 for s in logs.streams if s.error),
        "long_sent": len(logs.longs),
        "long_done": sum(1 for s in logs.longs if s.finished),
        "long_errors": sum(1 for s in logs.longs if s.error),
        "long_ttft_p50_ms": pct(long_ttft, 0.5) * ms,
        "long_ttft_p99_ms": pct(long_ttft, 0.99) * ms,
        "first_errors": errors[:3],
    }


# -- orchestration ---------------------------------------------------------------------------


def start_topology(
    topology: str, model_dir: Path, model: str, args: argparse.Namespace, log_dir: Path
) -> Stack:
    """NATS, Redis, two engines (one per GPU) and the gateway, ready to serve."""
    disagg = topology == "disaggregated"
    engine_args = shlex.split(args.base_engine_args) + shlex.split(args.engine_args)
    log_dir.mkdir(parents=True, exist_ok=True)
    config = StackConfig(
        model=str(model_dir),
        served_model_name=model,
        workers=0 if disagg else 2,
        prefill=1 if disagg else 0,
        decode=1 if disagg else 0,
        decode_args=["--local-prefill-below", str(args.local_prefill_below)],
        worker_args=engine_args,
        gateway_args=["--max-running", "4096", "--max-queue", "4096"],
        log_dir=log_dir,
        use_redis=args.use_redis,
        auth=False,  # an open stack: the client here sends no API key (the check costs microseconds)
    )
    roles = ["prefill", "decode"] if disagg else ["worker", "worker"]
    stack = Stack(config)
    try:
        stack.start_infra()
        for role, gpu in zip(roles, args.gpu_list or [None, None], strict=True):
            if gpu is not None:
                # Stack takes one environment per role; here each engine needs its own GPU.
                # (Not --device cuda:N: the engine never makes cuda:N the current device,
                # and Triton launches on the current one.)
                stack.config.role_env = {role: {"CUDA_VISIBLE_DEVICES": gpu}}
            stack.add_worker(shlex.split(args.disagg_args) if disagg else [], role=role)
        stack.start_gateway()
        stack.wait_ready(args.ready_timeout)
    except BaseException:
        stack.stop()
        raise
    return stack


async def measure_topology(url: str, model: str, topology: str, load: Load) -> list[dict[str, Any]]:
    """Warm up, then the baseline and the long-prompt phase, each followed by a wait
    until the engines are idle (so one phase's tail does not leak into the next)."""
    await warm_up(url, model, load, engines=2)
    before = counters(await wait_idle(url))
    rows = []
    for phase in PHASES:
        say(f"{topology}: {phase} phase ({load.settle:g} + {load.duration:g} s)")
        logs = await run_phase(url, model, load, phase)
        after = counters(await wait_idle(url))
        row = summarize(topology, phase, logs, load)
        row["counters"] = counters_delta(after, before)
        before = after
        rows.append(row)
        say(
            f"{topology}: {phase}: ITL p50 {row['itl_p50_ms']:.2f} ms, p99 {row['itl_p99_ms']:.2f} ms over {row['itl_gaps']} gaps"
        )
    base = rows[0]["itl_p99_ms"]
    for row in rows:
        row["p99_ratio"] = row["itl_p99_ms"] / base if base > 0 else float("nan")
    return rows


def say(message: str) -> None:
    print(f"pd_interference: {message}", flush=True)


def machine() -> dict[str, Any]:
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpus": gpus,
    }


def fmt_ms(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN: nothing measured


def disagg_notes(row: dict[str, Any], long_max_tokens: int) -> list[str]:
    """What makes the disaggregated long-prompt phase measure less than it should."""
    c, notes = row["counters"], []
    if c["remote_prefills"] < row["long_sent"]:
        notes.append(
            f"only {c['remote_prefills']} of {row['long_sent']} long prompts were prefilled remotely (decode log)"
        )
    if not any(t["transfers"] for t in c["transfers"].values()):
        why = (
            "max_tokens 1 ends a request at the prefill instance's first token"
            if long_max_tokens == 1
            else "see the logs"
        )
        notes.append(
            f"no KV was shipped to the decode instance ({why}; --long-max-tokens 2 includes the transfer)"
        )
    return notes


def print_report(
    rows: list[dict[str, Any]], failures: dict[str, str], header: str, long_max_tokens: int
) -> None:
    for row in rows:
        c = row["counters"]
        xfer = ", ".join(
            f"{b} {t['transfers']} ({t['bytes'] / 1e9:.2f} GB, {t['seconds']:.1f} s, {t['failures']} failed)"
            for b, t in c["transfers"].items()
            if t["transfers"] or t["failures"]
        )
        extra = f"; KV transfers: {xfer}" if xfer else ""
        if row["topology"] == "disaggregated":
            extra = (
                f"; prefills local {c['local_prefills']}, remote {c['remote_prefills']}, fallback {c['remote_fallbacks']}"
                + extra
            )
        errors = f"; errors: {row['first_errors']}" if row["first_errors"] else ""
        print(f"  {row['topology']:<13} {row['phase']:<8} preemptions {c['preemptions']}{extra}{errors}")
        if row["topology"] == "disaggregated" and row["phase"] == "long":
            for note in disagg_notes(row, long_max_tokens):
                print(f"  note: {note}")
    for topology, error in failures.items():
        print(f"  {topology}: FAILED: {error}")
    print(f"\n{header}")
    print(
        f"{'config':<28} {'ITL p50':>8} {'ITL p99':>8} {'p99/base':>8} {'long TTFT p50':>13} {'p99':>8} "
        f"{'long done':>9} {'streams':>7} {'tok/s':>7}"
    )
    for row in rows:
        label = f"{row['topology']} {'baseline' if row['phase'] == 'baseline' else '+ long prompts'}"
        print(
            f"{label:<28} {fmt_ms(row['itl_p50_ms']):>8} {fmt_ms(row['itl_p99_ms']):>8} {row['p99_ratio']:>7.2f}x "
            f"{fmt_ms(row['long_ttft_p50_ms']):>13} {fmt_ms(row['long_ttft_p99_ms']):>8} "
            f"{row['long_done']:>4}/{row['long_sent']:<4} {row['streams_completed']:>7} {row['decode_tokens_per_s']:>7.0f}"
        )
    ratio = {r["topology"]: r["p99_ratio"] for r in rows if r["phase"] == "long"}
    if "disaggregated" in ratio:
        d = ratio["disaggregated"]
        verdict = "PASS" if d <= TARGET_RATIO else "FAIL"
        agg = f"   (aggregated, same run: {ratio['aggregated']:.2f}x)" if "aggregated" in ratio else ""
        print(f"target: disaggregated p99 ITL <= {TARGET_RATIO}x its baseline: {d:.2f}x {verdict}{agg}")
    elif "aggregated" in ratio:
        print(
            f"aggregated p99 ITL with long prompts: {ratio['aggregated']:.2f}x its baseline (disaggregated not measured)"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = PROFILES["full"]
    # fmt: off
    ap.add_argument("--smoke", action="store_true", help="CPU check of the script: tiny model, tiny load, both topologies")
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES), help="comma-separated subset of: aggregated, disaggregated")
    ap.add_argument("--shape", choices=sorted(SHAPES), help=f"model shape (default {d['shape']})")
    ap.add_argument("--gpus", help=f"two GPUs: worker 0 / prefill, worker 1 / decode (default {d['gpus']})")
    ap.add_argument("--streams", type=int, help=f"concurrent decode streams (default {d['streams']})")
    ap.add_argument("--prompt-len", type=int, help=f"decode streams' prompt tokens (default {d['prompt_len']})")
    ap.add_argument("--decode-tokens", type=int, help=f"tokens per decode stream (default {d['decode_tokens']})")
    ap.add_argument("--duration", type=float, help=f"measurement window per phase, s (default {d['duration']:g})")
    ap.add_argument("--settle", type=float, help=f"s the streams run before the window opens (default {d['settle']:g})")
    ap.add_argument("--prefill-rate", type=float, help=f"long prompts per second, both GPUs together (default {d['prefill_rate']:g})")
    ap.add_argument("--long-len", help=f"long prompt lengths MIN-MAX, uniform (default {d['long_len']})")
    ap.add_argument("--arrivals", choices=["poisson", "fixed"], default="poisson", help="long-prompt arrival process")
    ap.add_argument("--long-max-tokens", type=int, default=1,
                    help="max_tokens of the long prompts (default 1: with disaggregation such a request ends at the "
                    "prefill instance's first token and no KV is shipped; 2 or more includes the transfer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--local-prefill-below", type=int,
                    help=f"decode instance: prefill shorter prompts locally (default {d['local_prefill_below']})")
    ap.add_argument("--engine-args", default="", help=f"extra flags of every engine, after the defaults ({GPU_ENGINE_ARGS})")
    ap.add_argument("--disagg-args", default="", help="extra flags of the prefill and decode instances (e.g. --kv-backends shm,tcp)")
    ap.add_argument("--redis", choices=["auto", "on", "off"], default="auto", help="start a redis-server with each stack (auto: if installed)")
    ap.add_argument("--ready-timeout", type=float, help=f"s to wait for a stack to be ready (default {d['ready_timeout']:g})")
    ap.add_argument("--log-dir", type=Path, help="stack logs go to DIR/<topology>/ (default: a new temporary directory)")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    # fmt: on
    args = ap.parse_args(argv)
    smoke = args.smoke
    for key, value in PROFILES["smoke" if smoke else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.base_engine_args = CPU_ENGINE_ARGS if smoke else GPU_ENGINE_ARGS
    args.use_redis = args.redis == "on" or (args.redis == "auto" and redis_installed())
    args.gpu_list = [g.strip() for g in args.gpus.split(",") if g.strip()] or None
    if args.gpu_list is not None and len(args.gpu_list) != 2:
        ap.error("--gpus takes two GPUs, e.g. 0,1")
    args.topology_list = [t.strip() for t in args.topologies.split(",") if t.strip()]
    if not args.topology_list or any(t not in TOPOLOGIES for t in args.topology_list):
        ap.error(f"--topologies: choose from {', '.join(TOPOLOGIES)}")
    lo, _, hi = args.long_len.partition("-")
    args.long_min, args.long_max = int(lo), int(hi or lo)
    if not 0 < args.long_min <= args.long_max or args.long_min < args.local_prefill_below:
        ap.error(
            "--long-len MIN-MAX: 0 < MIN <= MAX, and MIN >= --local-prefill-below (long prompts must go remote)"
        )
    if args.prompt_len >= args.local_prefill_below:
        ap.error("--prompt-len must be under --local-prefill-below (decode streams' prompts stay local)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, shape = SHAPES[args.shape]
    log_root = args.log_dir or Path(tempfile.mkdtemp(prefix="rtpllm-pd-logs-"))
    rows: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    signal.signal(signal.SIGTERM, raise_interrupt)  # stop the stacks on SIGTERM as on Ctrl-C
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rtpllm-pd-model-") as tmp:
        model_dir = write_model_dir(Path(tmp) / model, args.shape)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        load = Load(
            streams=args.streams, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
            duration=args.duration, settle=args.settle, prefill_rate=args.prefill_rate,
            long_min=args.long_min, long_max=args.long_max, arrivals=args.arrivals,
            long_max_tokens=args.long_max_tokens, seed=args.seed, vocab=vocab,
        )  # fmt: skip
        say(f"logs in {log_root}")
        for topology in args.topology_list:
            say(f"{topology}: starting the stack (2 engines, {model}) ...")
            t0 = time.monotonic()
            stack: Stack | None = None
            try:
                stack = start_topology(topology, model_dir, model, args, log_root / topology)
                say(f"{topology}: ready in {time.monotonic() - t0:.0f} s at {stack.url}; warming up")
                rows += asyncio.run(measure_topology(stack.url, model, topology, load))
            except KeyboardInterrupt:
                say("interrupted; stopping")
                return 130
            except Exception as exc:  # report it; the other topology may still run
                failures[topology] = f"{type(exc).__name__}: {exc}"
                say(f"{topology}: failed: {failures[topology]}")
            finally:
                if stack is not None:
                    stack.stop()
    header = (
        f"{model} on {'CPU' if args.smoke else 'GPUs ' + args.gpus}: {load.streams} streams x {load.decode_tokens} tokens "
        f"({load.prompt_len}-token prompts); long prompts {load.long_min}-{load.long_max} tokens "
        f"(max_tokens {load.long_max_tokens}) at {load.prefill_rate:g}/s ({load.arrivals}); {load.duration:g} s windows; ms"
    )
    print_report(rows, failures, header, load.long_max_tokens)
    if args.json:
        report = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "command": " ".join(sys.argv),
            "model_shape": {"name": model, **shape},
            "engine_args": args.base_engine_args + " " + args.engine_args,
            "disagg_args": args.disagg_args,
            "local_prefill_below": args.local_prefill_below,
            "load": asdict(load),
            "results": rows,
            "failures": failures,
            "target_ratio": TARGET_RATIO,
            "log_dir": str(log_root),
            "seconds": time.monotonic() - started,
        }
        args.json.write_text(json.dumps(strict_json(report), indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
