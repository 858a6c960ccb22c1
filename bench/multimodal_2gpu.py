"""Two GPUs, two multimodal topologies (issue 21): a vision service on one GPU feeding a
language-model worker on the other ("decoupled"), against two workers that each encode
their own images in process ("colocated"). Goodput under SLOs at a rising request rate,
and text-only inter-token latency while image requests arrive in bursts.

    python bench/multimodal_2gpu.py                                   # 2 GPUs, Qwen2-VL-2B shape, <= ~8.5 min
    python bench/multimodal_2gpu.py --devices cpu,cpu --shape tiny --rates 1,2 --duration 5 \\
        --quiet-s 3 --burst-s 6 --time-budget 200                    # CPU smoke run of the script

The model is bench/multimodal.py's: a config-only Qwen2-VL checkpoint
(rtpllm.multimodal.random_checkpoint; --shape 2b is Qwen2-VL-2B's shape), every process
drawing the same random weights (`--load-format dummy --seed S`). The two stacks run one
after the other (NATS, no Redis, one gateway each; `rtpllm.runtime.stack`):

  colocated  two workers, one per device of --devices, no vision service: each worker
             prepares and encodes its requests' images itself, in its engine step
  decoupled  one vision service on the first device, one worker on the second; the
             worker sends every image to the vision service (--local-encode-below 0)

With --pin visible (the default) a process on cuda:N runs with CUDA_VISIBLE_DEVICES=N and
`--device cuda` (as bench/pd_interference.py, whose cross-GPU cuda_ipc transfers worked so);
--pin flag passes `--device cuda:N` instead.

Load (the same in both stacks: seeded arrivals and images):
- sweep: chat requests with 1-4 images each (sizes 448x448 to 1024x768, as
  bench/multimodal.py), a short text, --max-tokens output tokens (ignore_eos), streamed,
  arriving as a Poisson process at each rate of --rates for --duration seconds. Every
  image is unique: a few base pictures per size (multimodal.make_image) carry a unique
  JPEG comment segment each, so no content hash repeats and neither the embedding cache
  nor the prefix cache can help (the pixels do not matter to random weights). After each
  window the requests still running get up to --drain-s to finish, then are cancelled
  (they count as SLO misses). TTFT = first token chunk - send; ITL = the gaps between a
  request's token chunks (continuous_usage_stats tells a token chunk), over every request
  sent in the window. A rate meets the SLOs when TTFT p99 <= --slo-ttft-ms and ITL p99 <=
  --slo-itl-ms and no request failed. The sweep stops at the second failing rate, or the
  first that misses an SLO by 1.5x or more, then tries --refine rates halfway between the
  highest met and the lowest missed. Goodput = the highest rate met (and the requests/s
  served there); the table prints decoupled / colocated (target >= 1.8x). A setup that met
  every rate it ran has a lower bound only (printed ">=").
- bursts: --text-streams closed-loop text-only streams (--text-tokens tokens each), first
  alone for --quiet-s, then for --burst-s with --burst-size image requests sent at once
  every --burst-every seconds; text-only ITL p50/p99/max of each window (gaps that end in
  it), and the image requests' TTFT.

The gateway's /metrics per rate (rtpllm_images by path: remote / local / fallback, the
towers' image counts) show which tower ran. The client's event-loop lag (a 10 ms ticker)
is recorded beside the ITLs: lag there inflates them.

--time-budget bounds the whole run (startup included): the first setup's sweep stops at
half of it, the second's before its end; a rate starts only if it can end in time. JSON to
--json, else $OUT/multimodal_2gpu.json when $OUT is set, else bench/results/. A short table
last. Stacks are stopped in `finally` (also on SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import multimodal as mm  # sets PYTHONPATH for the stacks' children, sys.path for rtpllm
from serving_bench import new_client, pct, raise_interrupt, strict_json

from rtpllm.multimodal.random_checkpoint import write_qwen2_vl_checkpoint
from rtpllm.runtime.stack import Stack

ROOT = mm.ROOT
SETUPS = ("colocated", "decoupled")
BASES_PER_SIZE = 4


def say(message: str) -> None:
    print(f"mm2gpu: {message}", flush=True)


# -- images and requests ---------------------------------------------------------------


def with_comment(jpeg: bytes, tag: str) -> bytes:
    """The same picture with a JPEG comment segment (COM) naming `tag`: other bytes, so
    another content hash, after the JFIF APP0 segment (or right after SOI)."""
    assert jpeg[:2] == b"\xff\xd8", "not a JPEG"
    pos = 2
    if jpeg[2:4] == b"\xff\xe0":
        pos = 4 + int.from_bytes(jpeg[4:6], "big")
    payload = f"rtpllm-bench {tag}".encode()
    return jpeg[:pos] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[pos:]


class Images:
    """BASES_PER_SIZE base pictures per size; every image handed out is unique."""

    def __init__(self, seed: int) -> None:
        t = time.perf_counter()
        self.bases = {
            size: [mm.make_image(seed + 1000 * i + k, *size) for k in range(BASES_PER_SIZE)]
            for i, size in enumerate(mm.SIZES)
        }
        self.seconds = time.perf_counter() - t

    def request_images(self, rng: random.Random, tag: str) -> list[bytes]:
        out = []
        for j in range(rng.randint(1, 4)):
            size = rng.choice(mm.SIZES)
            out.append(with_comment(rng.choice(self.bases[size]), f"{tag}-{j}"))
        return out


def body_bytes(messages: list[dict[str, Any]], max_tokens: int) -> bytes:
    body = {
        "model": mm.SERVED, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }  # fmt: skip
    return json.dumps(body).encode()


def image_body(i: int, images: list[bytes], max_tokens: int) -> bytes:
    content: list[dict[str, Any]] = [{"type": "text", "text": f"Request {i}: what is in these pictures?"}]
    for data in images:
        url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": "Answer briefly."})
    return body_bytes([{"role": "user", "content": content}], max_tokens)


def text_body(stream: int, n: int, max_tokens: int) -> bytes:
    text = f"Stream {stream}, request {n}: tell me a long story about the sea and its ships."
    return body_bytes([{"role": "user", "content": text}], max_tokens)


# -- one streamed request ----------------------------------------------------------------


def new_record(kind: str, images: int = 0) -> dict[str, Any]:
    return {"kind": kind, "images": images, "sent": None, "times": [], "tokens": 0, "prompt_tokens": 0,
            "done": False, "error": None}  # fmt: skip


async def stream(client: Any, url: str, body: bytes, rec: dict[str, Any]) -> None:
    """POST one streamed chat request; stamps each chunk that carries new tokens into
    rec["times"]. The record keeps what arrived if the task is cancelled."""
    rec["sent"] = time.perf_counter()
    try:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        ) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec["error"] = f"HTTP {resp.status_code}: {text[:300]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                usage = event.get("usage") or {}
                if usage:
                    rec["prompt_tokens"] = usage.get("prompt_tokens", rec["prompt_tokens"])
                if not event.get("choices"):
                    continue
                tokens = usage.get("completion_tokens")
                if tokens is None:  # no running totals: a chunk with content is a token chunk
                    delta = (event["choices"][0].get("delta") or {}).get("content")
                    tokens = rec["tokens"] + (1 if delta else 0)
                if tokens > rec["tokens"]:
                    rec["times"].append(now)
                    rec["tokens"] = tokens
        rec["done"] = True
    except asyncio.CancelledError:
        rec["error"] = rec["error"] or "cancelled (not finished in time)"
        raise
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        rec["error"] = repr(exc)[:300]


def ttft(rec: dict[str, Any]) -> float:
    """Seconds to the first token chunk; inf for a request that got none (failed, cancelled)."""
    return rec["times"][0] - rec["sent"] if rec["times"] else math.inf


def gaps(rec: dict[str, Any]) -> list[tuple[float, float]]:
    t = rec["times"]
    return [(t[i] - t[i - 1], t[i]) for i in range(1, len(t))]


class LoopLag:
    """Overshoot of a 10 ms sleep: how late this client's event loop runs its tasks."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            self.samples.append(time.perf_counter() - t - 0.01)

    def take(self) -> dict[str, float]:
        s, self.samples = self.samples, []
        return {
            "p50_ms": 1e3 * pct(s, 0.5),
            "p99_ms": 1e3 * pct(s, 0.99),
            "max_ms": 1e3 * max(s, default=0.0),
        }

    def stop(self) -> None:
        self.task.cancel()


def finite_json(value: Any) -> Any:
    """strict_json, with inf (a percentile over requests that got no token) as null too."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return strict_json(value)


def ms(values: list[float], q: float) -> float:
    v = pct(values, q)
    return 1e3 * v if math.isfinite(v) else math.inf


async def finish(tasks: list[asyncio.Task], timeout: float) -> int:
    """Wait up to `timeout` for the tasks, cancel the rest; returns how many were cancelled."""
    if not tasks:
        return 0
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)


# -- the sweep ----------------------------------------------------------------------------


def plan_rate(rate: float, args: argparse.Namespace, images: Images) -> list[tuple[float, int, bytes]]:
    """Poisson arrivals over --duration at `rate` req/s: (offset s, images, body); seeded by
    the rate alone, so both setups get the same requests."""
    rng = random.Random(f"{args.seed}-rate-{rate}")
    out: list[tuple[float, int, bytes]] = []
    at = rng.expovariate(rate)
    while at < args.duration:
        i = len(out)
        imgs = images.request_images(rng, f"rate{rate}-req{i}")
        out.append((at, len(imgs), image_body(i, imgs, args.max_tokens)))
        at += rng.expovariate(rate)
    return out


async def run_rate(
    client: Any, url: str, rate: float, args: argparse.Namespace, images: Images, lag: LoopLag
) -> dict[str, Any]:
    t = time.perf_counter()
    plan = plan_rate(rate, args, images)
    build_s = time.perf_counter() - t
    if not plan:
        return {"rate": rate, "skipped": "no arrivals in the window"}
    before = await mm.metrics(client, url)
    split_before = await images_by_instance(client, url)
    lag.take()
    recs: list[dict[str, Any]] = []
    tasks: list[asyncio.Task] = []
    t0 = time.perf_counter()
    for at, n_images, body in plan:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        rec = new_record("image", n_images)
        recs.append(rec)
        tasks.append(asyncio.create_task(stream(client, url, body, rec)))
    await asyncio.sleep(max(0.0, t0 + args.duration - time.perf_counter()))
    cancelled = await finish(tasks, args.drain_s)
    wall = time.perf_counter() - t0
    loop_lag = lag.take()
    after = await mm.settle(client, url)
    split = mm.delta(await images_by_instance(client, url), split_before)
    ok = [r for r in recs if r["done"] and r["error"] is None]
    ttfts = [ttft(r) for r in recs]
    itls = [g for r in recs for g, _ in gaps(r)]
    errors = [r["error"] for r in recs if r["error"] is not None]
    row = {
        "rate": rate,
        "duration_s": args.duration,
        "sent": len(recs),
        "completed": len(ok),
        "errors": len(errors),
        "cancelled": cancelled,
        "first_errors": sorted(set(errors))[:3],
        "served_rps": len(ok) / args.duration,
        "wall_s": wall,
        "images": sum(r["images"] for r in recs),
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in ok) / max(1, len(ok)),
        "output_tok_s": sum(r["tokens"] for r in recs) / wall,
        "ttft_ms_p50": ms(ttfts, 0.5),
        "ttft_ms_p90": ms(ttfts, 0.9),
        "ttft_ms_p99": ms(ttfts, 0.99),
        "itl_gaps": len(itls),
        "itl_ms_p50": ms(itls, 0.5),
        "itl_ms_p90": ms(itls, 0.9),
        "itl_ms_p99": ms(itls, 0.99),
        "itl_ms_max": 1e3 * max(itls, default=math.nan),
        "tokens_per_chunk": sum(r["tokens"] for r in recs) / max(1, sum(len(r["times"]) for r in recs)),
        "client_loop_lag": loop_lag,
        "body_build_s": build_s,
        "metrics_delta": mm.delta(after, before),
        "images_by_instance": split,
    }
    misses = []
    if not row["ttft_ms_p99"] <= args.slo_ttft_ms:
        misses.append(f"TTFT p99 {row['ttft_ms_p99']:.0f} ms")
    if not row["itl_ms_p99"] <= args.slo_itl_ms:
        misses.append(f"ITL p99 {row['itl_ms_p99']:.1f} ms")
    if errors:
        misses.append(f"{len(errors)} failed")
    row["slo_met"] = not misses
    row["misses"] = misses
    row["clear_miss"] = bool(errors) or not (
        row["ttft_ms_p99"] < 1.5 * args.slo_ttft_ms and row["itl_ms_p99"] < 1.5 * args.slo_itl_ms
    )
    return row


_IMAGES = re.compile(r'^rtpllm_images(?:_total)?\{[^}]*instance="([^"]*)"[^}]*\}\s+(\S+)', re.M)


async def images_by_instance(client: Any, url: str) -> dict[str, float]:
    """rtpllm_images summed over paths, per engine instance (how the gateway split the load)."""
    out: dict[str, float] = {}
    for instance, value in _IMAGES.findall((await client.get(f"{url}/metrics")).text):
        out[instance] = out.get(instance, 0.0) + float(value)
    return out


def rate_cost(args: argparse.Namespace) -> float:
    """Seconds one rate takes at least (window, a short drain, the metrics settle)."""
    return args.duration + 5.0


async def sweep(
    client: Any,
    url: str,
    args: argparse.Namespace,
    images: Images,
    lag: LoopLag,
    deadline: float,
    name: str,
    rows: list[dict[str, Any]],
) -> None:
    """Appends a row per rate to `rows` as it goes (an interrupted run keeps them)."""

    async def one(rate: float) -> dict[str, Any] | None:
        if time.perf_counter() + rate_cost(args) > deadline:
            say(f"{name}: rate {rate:g} skipped (time budget)")
            rows.append({"rate": rate, "skipped": "time budget"})
            return None
        row = await run_rate(client, url, rate, args, images, lag)
        rows.append(row)
        if "skipped" in row:
            say(f"{name}: rate {rate:g} skipped ({row['skipped']})")
            return row
        m = row["metrics_delta"]
        paths = {k.split("{")[1].rstrip("}"): int(v) for k, v in m.items() if k.startswith("rtpllm_images{")}
        say(
            f"{name} {rate:g} req/s: {row['completed']}/{row['sent']} done, {row['served_rps']:.2f} served/s, TTFT p50/p99 "
            f"{row['ttft_ms_p50']:.0f}/{row['ttft_ms_p99']:.0f} ms, ITL p50/p99/max {row['itl_ms_p50']:.1f}/{row['itl_ms_p99']:.1f}/"
            f"{row['itl_ms_max']:.0f} ms, SLO {'met' if row['slo_met'] else 'MISSED: ' + ', '.join(row['misses'])}; images by path {paths}, by instance "
            f"{sorted(int(v) for v in row['images_by_instance'].values())}, "
            f"loop lag p99 {row['client_loop_lag']['p99_ms']:.1f} ms"
        )
        return row

    misses = 0
    for rate in args.rate_list:
        row = await one(rate)
        if row is None:
            break
        if "skipped" in row or row["slo_met"]:
            misses = 0
            continue
        misses += 1
        if misses >= 2 or row["clear_miss"]:
            break
    for _ in range(args.refine):
        met = [r["rate"] for r in rows if r.get("slo_met")]
        missed = [r["rate"] for r in rows if "slo_met" in r and not r["slo_met"]]
        lo = max(met, default=0.0)
        above = [r for r in missed if r > lo]
        if not above:
            break
        hi = min(above)
        mid = round((lo + hi) / 2, 2) if lo > 0 else round(hi / 2, 2)
        if mid in (lo, hi) or mid <= 0 or any(r["rate"] == mid for r in rows):
            break
        row = await one(mid)
        if row is None or "skipped" in row:
            break


def goodput(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [r for r in rows if "slo_met" in r]
    met = [r for r in ran if r["slo_met"]]
    if not ran:
        return {"rate": None, "served_rps": None, "lower_bound": False, "rates_run": 0}
    if not met:
        lowest = min((r["rate"] for r in ran), default=None)
        return {
            "rate": 0.0,
            "served_rps": 0.0,
            "lower_bound": False,
            "rates_run": len(ran),
            "lowest_rate": lowest,
        }
    best = max(met, key=lambda r: r["rate"])
    return {
        "rate": best["rate"],
        "served_rps": best["served_rps"],
        # Nothing above it missed: the true goodput may be higher.
        "lower_bound": not any(not r["slo_met"] and r["rate"] > best["rate"] for r in ran),
        "rates_run": len(ran),
    }


# -- text-only streams during image bursts ----------------------------------------------------


async def bursts(
    client: Any, url: str, args: argparse.Namespace, images: Images, lag: LoopLag
) -> dict[str, Any]:
    stop = asyncio.Event()
    text_recs: list[dict[str, Any]] = []

    async def text_stream(k: int) -> None:
        n = 0
        while not stop.is_set():
            rec = new_record("text")
            text_recs.append(rec)
            await stream(client, url, text_body(k, n, args.text_tokens), rec)
            n += 1
            if rec["error"] is not None:
                await asyncio.sleep(0.2)

    rng = random.Random(f"{args.seed}-bursts")
    n_bursts = max(1, int(args.burst_s // args.burst_every))
    planned = [
        [
            (len(imgs), image_body(100_000 + b * 1000 + i, imgs, args.max_tokens))
            for i in range(args.burst_size)
            for imgs in [images.request_images(rng, f"burst{b}-req{i}")]
        ]
        for b in range(n_bursts)
    ]
    before = await mm.settle(client, url)  # the warm-up's counters in
    lag.take()
    streams = [asyncio.create_task(text_stream(k)) for k in range(args.text_streams)]
    t0 = time.perf_counter()
    quiet = (t0 + 2.0, t0 + 2.0 + args.quiet_s)  # 2 s for the streams to start
    burst = (quiet[1], quiet[1] + args.burst_s)
    await asyncio.sleep(max(0.0, quiet[1] - time.perf_counter()))
    quiet_lag = lag.take()
    image_recs: list[dict[str, Any]] = []
    image_tasks: list[asyncio.Task] = []
    for b, batch in enumerate(planned):
        await asyncio.sleep(max(0.0, burst[0] + 0.5 + b * args.burst_every - time.perf_counter()))
        for n_images, body in batch:
            rec = new_record("image", n_images)
            image_recs.append(rec)
            image_tasks.append(asyncio.create_task(stream(client, url, body, rec)))
    await asyncio.sleep(max(0.0, burst[1] - time.perf_counter()))
    burst_lag = lag.take()
    stop.set()
    cancelled = await finish(image_tasks, args.drain_s)
    cancelled_text = await finish(streams, args.drain_s)
    after = await mm.settle(client, url)

    def itl(window: tuple[float, float]) -> dict[str, Any]:
        g = [gap for r in text_recs for gap, end in gaps(r) if window[0] <= end < window[1]]
        return {
            "gaps": len(g),
            "itl_ms_p50": ms(g, 0.5),
            "itl_ms_p99": ms(g, 0.99),
            "itl_ms_max": 1e3 * max(g, default=math.nan),
        }

    ttfts = [ttft(r) for r in image_recs]
    errors = [r["error"] for r in (*text_recs, *image_recs) if r["error"] is not None]
    out = {
        "text_streams": args.text_streams,
        "text_tokens": args.text_tokens,
        "bursts": n_bursts,
        "burst_size": args.burst_size,
        "burst_every_s": args.burst_every,
        "quiet": itl(quiet) | {"client_loop_lag": quiet_lag},
        "during_bursts": itl(burst) | {"client_loop_lag": burst_lag},
        "text_requests": len(text_recs),
        "image_requests": len(image_recs),
        "images": sum(r["images"] for r in image_recs),
        "image_ttft_ms_p50": ms(ttfts, 0.5),
        "image_ttft_ms_p99": ms(ttfts, 0.99),
        "errors": len([e for e in errors if not e.startswith("cancelled")]),
        "cancelled": cancelled + cancelled_text,
        "first_errors": sorted(set(errors))[:3],
        "metrics_delta": mm.delta(after, before),
    }
    q, b = out["quiet"], out["during_bursts"]
    say(
        f"bursts: text ITL p99 {q['itl_ms_p99']:.1f} ms alone -> {b['itl_ms_p99']:.1f} ms during bursts (max {q['itl_ms_max']:.0f} -> "
        f"{b['itl_ms_max']:.0f} ms); {len(image_recs)} image requests, TTFT p50/p99 {out['image_ttft_ms_p50']:.0f}/"
        f"{out['image_ttft_ms_p99']:.0f} ms; {out['errors']} errors"
    )
    return out


# -- stacks --------------------------------------------------------------------------------


def placement(device: str, pin: str) -> tuple[list[str], dict[str, str]]:
    """(--device flags, environment) of a process on `device`."""
    if device.startswith("cuda") and pin == "visible":
        index = device.partition(":")[2] or "0"
        return ["--device", "cuda"], {"CUDA_VISIBLE_DEVICES": index}
    return ["--device", device], {}


def start_setup(name: str, model_dir: Path, args: argparse.Namespace, log_dir: Path) -> Stack:
    decoupled = name == "decoupled"
    cuda = any(d.startswith("cuda") for d in args.device_list)
    engine, vision_args = mm.service_args(args, [], cuda, decoupled)  # devices: per process below
    # The vision service is added here, on its own device.
    config = mm.stack_config(model_dir, engine, vision_args, 1 if decoupled else 2, 0, log_dir)
    stack = Stack(config)
    t0 = time.perf_counter()
    try:
        stack.start_infra()
        if decoupled:
            flags, env = placement(args.device_list[1], args.pin)
            stack.config.role_env = {"worker": env}
            stack.add_worker(flags)  # loads while the vision service does
            flags, env = placement(args.device_list[0], args.pin)
            stack.config.role_env = {"vision": env}
            stack.add_vision(flags, timeout=args.ready_timeout)
        else:
            for device in args.device_list:
                flags, env = placement(device, args.pin)
                # Stack takes one environment per role; each worker needs its own device.
                stack.config.role_env = {"worker": env}
                stack.add_worker(flags)
        stack.start_gateway()
        stack.wait_ready(args.ready_timeout)
    except BaseException:
        mm.stop_stack(stack)
        raise
    say(f"{name} stack ready in {time.perf_counter() - t0:.1f} s (logs in {log_dir})")
    return stack


async def warm_up(client: Any, url: str, args: argparse.Namespace, images: Images) -> None:
    """bench/multimodal.py's warm-up (sequential image requests of several sizes), then a
    concurrent round of image and text requests, so every worker has compiled its kernels
    for image prompts and the worker has seen the vision service's heartbeat."""
    await mm.warm_up(client, url, seed=7_000_000)
    rng = random.Random(f"{args.seed}-warm")
    recs = [new_record("image") for _ in range(8)] + [new_record("text") for _ in range(8)]
    bodies = [image_body(i, images.request_images(rng, f"warm-{i}"), 16) for i in range(8)]
    bodies += [text_body(i, 0, 16) for i in range(8)]
    for _ in range(2):
        await asyncio.gather(*(stream(client, url, b, r) for b, r in zip(bodies, recs, strict=True)))
        bodies[:8] = [image_body(i, images.request_images(rng, f"warm2-{i}"), 16) for i in range(8)]
    bad = [r["error"] for r in recs if r["error"]]
    if bad:
        raise RuntimeError(f"warm-up requests failed: {bad[:2]}")
    await mm.settle(client, url)  # the warm-up's counters reach /metrics before a phase reads them


async def measure(
    name: str,
    url: str,
    args: argparse.Namespace,
    images: Images,
    began: float,
    left: int,
    end: float,
    out: dict[str, Any],
) -> None:
    """Warm-up, the burst part, the sweep, into `out` as they finish. The sweep's deadline
    shares the time to `end` with the `left - 1` setups still to come, each assumed to
    need this one's fixed cost (start, warm-up, bursts) before its own sweep."""
    async with new_client() as client:
        lag = LoopLag()
        try:
            t = time.perf_counter()
            await warm_up(client, url, args, images)
            out["warm_up_s"] = time.perf_counter() - t
            say(f"{name}: warmed up in {out['warm_up_s']:.1f} s")
            if args.burst_s > 0:
                out["bursts"] = await bursts(client, url, args, images, lag)
            now = time.perf_counter()
            fixed = now - began
            deadline = now + max(0.0, end - now - (left - 1) * fixed) / left
            out["sweep_deadline_s"] = deadline - now
            out["sweep"] = []
            await sweep(client, url, args, images, lag, deadline, name, out["sweep"])
        finally:
            lag.stop()


# -- report --------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".0f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def summarize(result: dict[str, Any], args: argparse.Namespace) -> None:
    s = result["setups"]
    gp = {k: v["goodput"] for k, v in s.items() if v.get("goodput", {}).get("rate") is not None}
    if len(gp) == 2:
        d, c = gp["decoupled"], gp["colocated"]
        result["goodput_ratio"] = d["rate"] / c["rate"] if c["rate"] > 0 else math.nan
        result["served_ratio"] = d["served_rps"] / c["served_rps"] if c["served_rps"] > 0 else math.nan
        if c["rate"] == 0 and d["rate"] > 0 and c.get("lowest_rate"):
            # Colocated missed even its lowest rate: its goodput is below that, the ratio above.
            result["goodput_ratio"] = d["rate"] / c["lowest_rate"]
            result["ratio_bound"] = "lower"
            return
        # A lower bound on the decoupled side (it met every rate it ran) still bounds the ratio
        # from below; one on the colocated side makes the ratio an upper bound.
        result["ratio_bound"] = (
            "lower" if d["lower_bound"] and not c["lower_bound"] else "upper" if c["lower_bound"] and not d["lower_bound"] else
            "unknown" if d["lower_bound"] and c["lower_bound"] else "exact"
        )  # fmt: skip


def print_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{result['device_names']}, shape {args.shape}, {args.max_tokens} output tokens, {args.duration:g} s per rate,"
          f" SLO TTFT p99 <= {args.slo_ttft_ms:g} ms, ITL p99 <= {args.slo_itl_ms:g} ms")  # fmt: skip
    head = f"{'setup':10} {'rate':>5} {'sent':>5} {'done':>5} {'err':>4} {'served/s':>8} {'TTFT p50/p99 ms':>16} {'ITL p50/p99/max ms':>20} {'remote/local imgs':>17}  SLO"
    print(head)
    for name, s in result["setups"].items():
        for r in s.get("sweep", []):
            if "slo_met" not in r:
                print(f"{name:10} {r['rate']:>5g}  skipped ({r.get('skipped')})")
                continue
            m = r["metrics_delta"]
            remote = int(m.get("rtpllm_images{remote}", 0))
            local = int(m.get("rtpllm_images{local}", 0) + m.get("rtpllm_images{fallback}", 0))
            print(
                f"{name:10} {r['rate']:>5g} {r['sent']:>5} {r['completed']:>5} {r['errors']:>4} {r['served_rps']:>8.2f}"
                f" {fmt(r['ttft_ms_p50']) + '/' + fmt(r['ttft_ms_p99']):>16}"
                f" {fmt(r['itl_ms_p50'], '.1f') + '/' + fmt(r['itl_ms_p99'], '.1f') + '/' + fmt(r['itl_ms_max']):>20}"
                f" {f'{remote}/{local}':>17}  {'met' if r['slo_met'] else 'missed: ' + ', '.join(r['misses'])}"
            )
    for name, s in result["setups"].items():
        if "error" in s:
            print(f"{name}: FAILED: {s['error']}")
    for name, s in result["setups"].items():
        b = s.get("bursts")
        if b:
            q, d = b["quiet"], b["during_bursts"]
            print(f"text-only ITL, {name}: p99 {fmt(q['itl_ms_p99'], '.1f')} ms alone -> {fmt(d['itl_ms_p99'], '.1f')} ms during image bursts"
                  f" (p50 {fmt(d['itl_ms_p50'], '.1f')}, max {fmt(d['itl_ms_max'])}); burst image TTFT p99 {fmt(b['image_ttft_ms_p99'])} ms")  # fmt: skip
    for name, s in result["setups"].items():
        g = s.get("goodput")
        if g and g["rate"] is None:
            print(f"goodput, {name}: not measured (no rate ran)")
        elif g:
            print(
                f"goodput, {name}: {'>= ' if g['lower_bound'] else ''}{g['rate']:g} req/s offered ({g['served_rps']:.2f} served/s)"
            )
    if "goodput_ratio" in result:
        ratio, bound = result["goodput_ratio"], result["ratio_bound"]
        if ratio != ratio:
            verdict = "not measured (neither setup met any rate: add lower rates)"
        elif bound == "exact" or (bound == "lower" and ratio >= 1.8) or (bound == "upper" and ratio < 1.8):
            verdict = "met" if ratio >= 1.8 else "missed"
        else:  # a bound on the wrong side of the target: more rates would tell
            verdict = "not settled (a setup met every rate it ran)"
        shown = {"lower": ">= ", "upper": "<= ", "unknown": "~ ", "exact": ""}[bound]
        print(
            f"goodput decoupled / colocated: {shown}{fmt(ratio, '.2f')}x (served {fmt(result['served_ratio'], '.2f')}x); "
            f"target >= 1.8x: {verdict}"
        )
    if result["leaked"]:
        print(f"LEAKED processes (killed): {result['leaked']}")


def device_names(devices: list[str]) -> str:
    names = []
    for d in devices:
        if not d.startswith("cuda"):
            names.append(f"{d} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
            continue
        index = d.partition(":")[2] or "0"
        try:
            out = subprocess.run(["nvidia-smi", "-i", index, "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
            names.append(f"{d}: {out.stdout.strip()}")
        except (OSError, subprocess.SubprocessError):
            names.append(d)
    return ", ".join(names)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--devices",
        default="cuda:0,cuda:1",
        help="two devices: vision service / first worker, then the second (cpu,cpu for a smoke run)",
    )
    ap.add_argument(
        "--pin",
        choices=["visible", "flag"],
        default="visible",
        help="cuda:N as CUDA_VISIBLE_DEVICES=N + --device cuda, or as --device cuda:N",
    )
    ap.add_argument(
        "--shape", choices=["2b", "tiny"], default="2b", help="Qwen2-VL-2B's shape, or a tiny one for CPU"
    )
    ap.add_argument("--setups", default=",".join(SETUPS), help="which, in this order")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--seed", type=int, default=0, help="random weights (every process), arrivals and images")
    ap.add_argument(
        "--rates", default="1,2,4,8,12,16,24,32", help="request rates of the sweep, req/s, rising"
    )
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate")
    ap.add_argument(
        "--drain-s",
        type=float,
        default=15.0,
        help="after a window, seconds its requests get to finish before they are cancelled",
    )
    ap.add_argument(
        "--refine",
        type=int,
        default=1,
        help="rates tried halfway between the highest met and the lowest missed",
    )
    ap.add_argument(
        "--max-tokens", type=int, default=64, help="output tokens of an image request (ignore_eos)"
    )
    ap.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    ap.add_argument("--slo-itl-ms", type=float, default=50.0)
    ap.add_argument("--text-streams", type=int, default=8, help="text-only streams of the burst part")
    ap.add_argument("--text-tokens", type=int, default=128, help="output tokens of a text-only request")
    ap.add_argument("--quiet-s", type=float, default=6.0, help="text streams alone (the baseline)")
    ap.add_argument(
        "--burst-s", type=float, default=20.0, help="text streams with image bursts (0: no burst part)"
    )
    ap.add_argument("--burst-every", type=float, default=4.0, help="seconds between bursts")
    ap.add_argument("--burst-size", type=int, default=8, help="image requests per burst, sent at once")
    ap.add_argument(
        "--gpu-memory-utilization", type=float, default=0.6, help="CUDA engines' share of their GPU"
    )
    ap.add_argument(
        "--no-cuda-graphs", action="store_true", help="engines without CUDA graphs (faster start)"
    )
    ap.add_argument("--engine-args", default="", help="extra flags of the engines")
    ap.add_argument("--vision-args", default="", help="extra flags of the vision service")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument(
        "--time-budget",
        type=float,
        default=490.0,
        help="seconds for the whole run; rates that would overrun are skipped",
    )
    ap.add_argument(
        "--model-dir", type=Path, help="write (or reuse) the checkpoint here (default: a temporary directory)"
    )
    ap.add_argument(
        "--log-dir", type=Path, help="stack logs go to DIR/<setup>/ (default: a temporary directory)"
    )
    ap.add_argument(
        "--json",
        type=Path,
        help="where the JSON goes (default: $OUT/multimodal_2gpu.json, else bench/results/)",
    )
    args = ap.parse_args(argv)
    args.device_list = [d.strip() for d in args.devices.split(",") if d.strip()]
    if len(args.device_list) != 2:
        ap.error("--devices takes two devices, e.g. cuda:0,cuda:1 or cpu,cpu")
    args.rate_list = [float(r) for r in args.rates.split(",") if r.strip()]
    if not args.rate_list or any(r <= 0 for r in args.rate_list) or args.rate_list != sorted(args.rate_list):
        ap.error("--rates: positive and rising, e.g. 1,2,4,8")
    args.setup_list = [s.strip() for s in args.setups.split(",") if s.strip()]
    if not args.setup_list or set(args.setup_list) - set(SETUPS):
        ap.error(f"--setups: a subset of {', '.join(SETUPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)  # `timeout` / the device tool: still stop the stacks
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="rtpllm-mm2gpu-"))
    model_dir = args.model_dir or tmp / f"qwen2-vl-{args.shape}"
    write_qwen2_vl_checkpoint(model_dir, args.shape)
    log_root = args.log_dir or tmp / "logs"
    images = Images(args.seed + 50_000)
    say(
        f"{len(mm.SIZES) * BASES_PER_SIZE} base images in {images.seconds:.1f} s; checkpoint {model_dir}; logs {log_root}"
    )
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "device_names": device_names(args.device_list),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_dir": str(model_dir),
        "log_dir": str(log_root),
        "setups": {},
        "leaked": [],
    }
    failed = None
    try:
        for i, name in enumerate(args.setup_list):
            began = time.perf_counter()
            end = t_start + args.time_budget - 15.0  # the last stop, the report
            entry: dict[str, Any] = {}
            result["setups"][name] = entry
            try:
                stack = start_setup(name, model_dir, args, log_root / name)
            except Exception as exc:  # noqa: BLE001 - the other setup still runs
                entry["error"] = f"{type(exc).__name__}: {exc}"
                failed = failed or f"{name}: {entry['error']}"
                say(f"{name} FAILED to start: {entry['error']}")
                continue
            try:
                entry["startup"] = mm.stack_startup(log_root / name)
                asyncio.run(
                    measure(name, stack.url, args, images, began, len(args.setup_list) - i, end, entry)
                )
            except Exception as exc:  # noqa: BLE001 - recorded, the other setup still runs
                entry["error"] = f"{type(exc).__name__}: {exc}"
                failed = failed or f"{name}: {entry['error']}"
                say(f"{name} FAILED: {entry['error']}")
            finally:
                result["leaked"] += mm.stop_stack(stack)
    except KeyboardInterrupt as exc:
        failed = f"interrupted ({type(exc).__name__})"
        result["error"] = failed
        say(f"FAILED: {failed}")
    for entry in result["setups"].values():
        if "sweep" in entry:
            entry["goodput"] = goodput(entry["sweep"])  # over the rates that ran
    summarize(result, args)
    result["seconds"] = time.perf_counter() - t_start
    out_path = args.json
    if out_path is None:
        if os.environ.get("OUT"):
            out_path = Path(os.environ["OUT"]) / "multimodal_2gpu.json"
        else:
            tag = "cpu" if all(d == "cpu" for d in args.device_list) else "2gpu"
            out_path = (
                ROOT
                / "bench"
                / "results"
                / f"{datetime.date.today()}-{tag}"
                / f"multimodal_2gpu-{args.shape}.json"
            )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(finite_json(result), indent=1) + "\n")
    say(f"wrote {out_path} ({result['seconds']:.0f} s in all)")
    print_table(result, args)
    return 1 if failed or result["leaked"] else 0


if __name__ == "__main__":
    sys.exit(main())
