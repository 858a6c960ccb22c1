"""Images in the chat API (issue 15): the vision tower batched, the vision service's
embedding cache, and a whole stack with and without the vision service.

    python bench/multimodal.py --device cuda                          # one GPU, Qwen2-VL-2B shape, ~6 min
    python bench/multimodal.py --device cpu --shape tiny --requests 8 --concurrency 4   # CPU smoke run
    python bench/multimodal.py --device cuda --only encoder           # one part: encoder, ttft, throughput

The model is a config-only Qwen2-VL checkpoint (rtpllm.multimodal.random_checkpoint,
written to a temporary directory): --shape 2b is Qwen2-VL-2B's shape (LM 1536 x 28
layers, ViT 1280 x 32 blocks, the real preprocessor limits), --shape tiny a CPU-sized
model of the same structure. Engines and vision services load it with `--load-format
dummy --seed S`: every process draws the same random weights.

Images: random smooth RGB pictures with noise, saved as JPEG (quality 85): ~135 KB at
1024x768, like photos. (Noise PNGs of these sizes are 0.6-2.4 MB each, and a request's
images travel in one NATS message: 8 MiB with the nats-servers rtpllm starts.) Sizes 448x448 to 1024x768
(256 to 999 image tokens each on the 2b shape); every image of a part has its own seed,
so nothing is cached unless the part means it to be.

Parts (--only picks a subset; all by default, in this order):

1. encoder: VisionEncoder in this process. Per image set (the realistic sizes, and small
   ones of 224x224 to 336x336), images/s of `encode` one image per call vs
   --encode-batch images per call (target: batched >= 3x batch 1), after a warm-up
   pass, torch.cuda.synchronize around each timing; the CPU preprocessing per image
   (`prepare`: decode, resize, normalize, patch) beside.
2. ttft: a stack (nats-server, one vision service, one worker, the gateway; no Redis)
   serving --ttft-trials sequential chat requests with 2 fresh images each (1024x768 and
   800x600, ~1,600 image tokens), then the same images again three ways:
   - "embedding cached": different text BEFORE the images, so the engine's prefix
     cache covers only the system prompt and every image token is prefilled again; the
     vision service answers from its embedding cache (target: TTFT <= 0.5x uncached);
   - "embedding + prefix cached": the same text and images, another question after
     them (the prefix cache covers the images' KV too);
   - "identical": the first request again.
   The gateway's /metrics (rtpllm_vision_images_encoded, rtpllm_vision_cache_hits) are
   read after each phase (after a heartbeat) to show the tower did not run again.
   The same phases run on the vision=0 stack of part 3 (the engine encodes): uncached,
   and its "embedding cached" phase re-encodes.
3. throughput: --requests chat requests with 1-4 fresh images each, --concurrency
   clients, --max-tokens output tokens (ignore_eos), streamed; requests/s, output tok/s,
   TTFT p50/p99, once with the vision service (the part-2 stack) and once with vision=0
   (the same stack without it: the engine prepares and encodes its images itself).

Reported: a table last, and every figure as JSON in $OUT/multimodal.json when $OUT is
set, else --json, else bench/results/<date>-<device>/multimodal-<shape>.json. Stacks
are stopped in `finally` (also on SIGTERM) and their process groups checked gone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import os
import platform
import random
import re
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The stack's children (python -m rtpllm.cli) import rtpllm and services from here.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "libs"), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)
sys.path.insert(0, str(ROOT / "libs"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from serving_bench import new_client, pct, raise_interrupt, strict_json  # noqa: E402

from rtpllm.multimodal.random_checkpoint import write_qwen2_vl_checkpoint  # noqa: E402
from rtpllm.runtime.stack import Stack, StackConfig  # noqa: E402

PARTS = ("encoder", "ttft", "throughput")
SERVED = "qwen2-vl-bench"
# Realistic sizes (width, height), 448x448 to 1024x768, both orientations.
SIZES = [(448, 448), (640, 480), (480, 640), (800, 600), (1024, 768), (768, 1024), (896, 672), (512, 512)]
SMALL_SIZES = [(224, 224), (256, 256), (320, 240), (336, 336)]
TTFT_SIZES = [(1024, 768), (800, 600)]
METRICS = (
    "rtpllm_vision_images_encoded", "rtpllm_vision_cache_hits", "rtpllm_vision_cache_misses",
    "rtpllm_vision_encode_seconds", "rtpllm_vision_batches", "rtpllm_vision_embedding_bytes",
    "rtpllm_vision_failures", "rtpllm_images", "rtpllm_engine_images_encoded",
)  # fmt: skip
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?P<labels>\{[^}]*\})?\s+(?P<value>\S+)")


def say(message: str) -> None:
    print(f"multimodal: {message}", flush=True)


# -- images ------------------------------------------------------------------------------


def make_image(seed: int, width: int, height: int, quality: int = 85) -> bytes:
    """A smooth random picture with pixel noise, as JPEG bytes."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 48), max(2, width // 48), 3), dtype=np.uint8)
    smooth = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32
    )
    pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


# -- part 1: the encoder in this process ------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def encoder_part(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:

    from rtpllm.config import parse_dtype
    from rtpllm.multimodal.encoder import VisionEncoder
    from rtpllm.multimodal.image_input import content_hash
    from rtpllm.protocol.messages import ImageSpec

    dtype = parse_dtype(args.dtype, args.device)
    t0 = time.perf_counter()
    enc = VisionEncoder.load(model_dir, dtype, args.device, random_seed=args.seed)
    out: dict[str, Any] = {
        "load_s": time.perf_counter() - t0,
        "dtype": str(dtype),
        "batch": args.encode_batch,
        "sets": {},
    }

    def spec(data: bytes) -> ImageSpec:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
        token_ids, grid = enc.family.placeholder(width, height, enc.tokenizer)
        return ImageSpec(
            content_hash=content_hash(data), runs=[(0, len(token_ids))], grid_thw=grid, data=data
        )

    for set_no, (name, sizes) in enumerate((("realistic", SIZES), ("small", SMALL_SIZES))):
        n = args.encoder_images
        datas = [make_image(10_000 * (set_no + 1) + i, *sizes[i % len(sizes)]) for i in range(n)]
        t = time.perf_counter()
        images = [enc.prepare(spec(d)) for d in datas]
        prep_ms = 1e3 * (time.perf_counter() - t) / n
        patches = sum(int(np.prod(im.grid_thw)) for im in images)
        tokens = sum(im.num_embeds for im in images)
        batches = [images[i : i + args.encode_batch] for i in range(0, n, args.encode_batch)]
        # Warm-up: every image once alone and every batch once (kernels for these shapes,
        # cuBLAS workspaces, the allocator's blocks).
        for im in images:
            enc.encode([im])
        for batch in batches:
            enc.encode(batch)
        sync(args.device)
        timings: dict[str, list[float]] = {"batch1": [], "batched": []}
        for _ in range(args.encoder_reps):
            for mode, calls in (("batch1", [[im] for im in images]), ("batched", batches)):
                sync(args.device)
                t = time.perf_counter()
                for call in calls:
                    enc.encode(call)
                sync(args.device)
                timings[mode].append(time.perf_counter() - t)
        best = {mode: min(ts) for mode, ts in timings.items()}
        row = {
            "images": n,
            "sizes": sizes,
            "patches": patches,
            "image_tokens": tokens,
            "jpeg_kb_mean": round(sum(len(d) for d in datas) / n / 1024, 1),
            "prepare_ms_per_image": round(prep_ms, 2),
            "seconds": timings,
            "batch1_images_s": n / best["batch1"],
            "batched_images_s": n / best["batched"],
            "batch1_ms_per_call": 1e3 * best["batch1"] / n,
            "batched_ms_per_call": 1e3 * best["batched"] / len(batches),
            "batched_patches_s": patches / best["batched"],
        }
        row["speedup"] = row["batched_images_s"] / row["batch1_images_s"]
        out["sets"][name] = row
        say(
            f"encoder {name}: {n} images ({patches} patches, {tokens} tokens), batch 1 {row['batch1_images_s']:.1f} img/s, "
            f"batch {args.encode_batch} {row['batched_images_s']:.1f} img/s ({row['speedup']:.2f}x); prepare {prep_ms:.1f} ms/img"
        )
    return out


# -- stacks ------------------------------------------------------------------------------


def service_args(args: argparse.Namespace, device_flags: list[str], cuda: bool, embeddings: bool) -> tuple[list[str], list[str]]:
    """(engine flags, vision-service flags) of a bench stack: random weights of --shape,
    the device flags given (empty: set per process), and with `embeddings` (a vision
    service feeds the engine) room for every in-flight request's embeddings."""
    common = [*device_flags, "--load-format", "dummy", "--seed", str(args.seed), "--dtype", args.dtype]
    engine = list(common)
    if cuda:
        engine += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.no_cuda_graphs:
        engine.append("--no-cuda-graphs")
    if embeddings and args.shape == "2b":
        # Room for every concurrent request's embeddings (up to 4 x 3 MiB each) in the
        # engine's receiving pool (256 MiB by default).
        engine += ["--embedding-pool-mib", "1024"]
    return engine + shlex.split(args.engine_args), common + shlex.split(args.vision_args)


def stack_config(model_dir: Path, engine: list[str], vision_args: list[str], workers: int, vision: int, log_dir: Path) -> StackConfig:
    """An open (no keys, no Redis) stack serving the bench's model, whose gateway admits
    every request the load sends."""
    log_dir.mkdir(parents=True, exist_ok=True)
    return StackConfig(
        model=str(model_dir),
        served_model_name=SERVED,
        workers=workers,
        vision=vision,
        vision_args=vision_args,
        worker_args=engine,
        gateway_args=["--max-running", "4096", "--max-queue", "4096"],
        log_dir=log_dir,
        use_redis=False,
        auth=False,  # open: the client sends no key
    )


def start_stack(model_dir: Path, args: argparse.Namespace, vision: int, log_dir: Path) -> Stack:
    engine, vision_args = service_args(args, ["--device", args.device], args.device.startswith("cuda"), vision > 0)
    config = stack_config(model_dir, engine, vision_args, 1, vision, log_dir)
    stack = Stack(config)
    t0 = time.perf_counter()
    try:
        stack.start()
        stack.wait_ready(args.ready_timeout)
    except BaseException:
        stop_stack(stack)
        raise
    say(f"stack vision={vision} ready in {time.perf_counter() - t0:.1f} s (logs in {log_dir})")
    return stack


def stop_stack(stack: Stack) -> list[str]:
    """Stop every process; returns those whose process group outlived the stop (killed then)."""
    stack.stop()
    procs = [
        p
        for p in (stack.gateway, *stack.workers, *stack.visions, stack.kvstore, stack.redis, stack.nats)
        if p is not None
    ]
    leaked = []
    for proc in procs:
        if proc.proc is None:
            continue
        try:
            os.killpg(proc.pid, 0)  # children start their own session: group id = pid
        except (ProcessLookupError, PermissionError):
            continue
        leaked.append(f"{proc.name} (pid {proc.pid}, rc {proc.returncode})")
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leaked:
        say(f"LEAK: process groups still alive after stop (killed): {', '.join(leaked)}")
    return leaked


async def metrics(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """The METRICS series of the gateway's /metrics, summed over instances; labelled by
    `cache` (vision hits) and `path` (engine images) where they have one."""
    text = (await client.get(f"{url}/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m["name"].removesuffix("_total") not in METRICS:
            continue
        key = m["name"].removesuffix("_total")
        for label in ("cache", "path"):
            lm = re.search(label + r'="([^"]*)"', m["labels"] or "")
            if lm:
                key += f"{{{lm[1]}}}"
        out[key] = out.get(key, 0.0) + float(m["value"])
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 4) for k, v in sorted(after.items()) if v != before.get(k, 0.0)}


async def chat(
    client: httpx.AsyncClient, url: str, before: str, images: list[bytes], after: str, max_tokens: int
) -> dict[str, Any]:
    """One streamed chat request: TTFT (first content chunk), tokens, usage."""
    content: list[dict[str, Any]] = [{"type": "text", "text": before}]
    content += [{"type": "image_url", "image_url": {"url": data_url(d)}} for d in images]
    content.append({"type": "text", "text": after})
    body = {
        "model": SERVED, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    sent = time.perf_counter()
    first = None
    chunks = 0
    usage: dict[str, Any] = {}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(
                f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
            )
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    end = time.perf_counter()
    return {
        "ttft": (first - sent) if first is not None else float("nan"),
        "latency": end - sent,
        "chunks": chunks,
        "completion_tokens": usage.get("completion_tokens", 0),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
    }


async def settle(client: httpx.AsyncClient, url: str, heartbeat_s: float = 1.3) -> dict[str, float]:
    await asyncio.sleep(heartbeat_s)  # the instances' next heartbeats carry the counters
    return await metrics(client, url)


async def warm_up(client: httpx.AsyncClient, url: str, seed: int) -> None:
    """A few image requests (sizes of both parts) before timing anything, so kernels for
    image prompts are compiled and the engine has seen the vision service's heartbeat."""
    for i, sizes in enumerate(
        ([(640, 480)], [(1024, 768), (800, 600)], [(448, 448), (512, 512), (896, 672)])
    ):
        images = [make_image(seed + 100 * i + j, *s) for j, s in enumerate(sizes)]
        await chat(client, url, f"warm-up {i}: look.", images, "Describe.", 8)
    await asyncio.gather(
        *(
            chat(client, url, f"warm-up c{i}", [make_image(seed + 900 + i, 640, 480)], "Go.", 8)
            for i in range(4)
        )
    )


PHASES = (
    ("uncached", "{k}: describe these pictures.", "Compare them."),
    ("embedding_cached", "{k}: now something else entirely. Again:", "Compare them."),
    ("embedding_and_prefix_cached", "{k}: describe these pictures.", "What differs between them?"),
    ("identical", "{k}: describe these pictures.", "Compare them."),
)


async def ttft_part(url: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    async with new_client() as client:
        await warm_up(client, url, seed)
        before = await settle(client, url)
        trials = [
            [make_image(seed + 1000 * k + j, *s) for j, s in enumerate(TTFT_SIZES)]
            for k in range(args.ttft_trials)
        ]
        out: dict[str, Any] = {"warm_up_metrics": before, "images_per_request": len(TTFT_SIZES), "phases": {}}
        for phase, text_before, text_after in PHASES:
            rows = []
            for k, images in enumerate(trials):
                rows.append(
                    await chat(
                        client, url, text_before.format(k=f"trial {k}"), images, text_after, args.ttft_tokens
                    )
                )
            after = await settle(client, url)
            ttfts = [r["ttft"] for r in rows]
            out["phases"][phase] = {
                "ttft_ms": [round(1e3 * t, 2) for t in ttfts],
                "ttft_ms_median": 1e3 * statistics.median(ttfts),
                "ttft_ms_mean": 1e3 * statistics.mean(ttfts),
                "prompt_tokens": rows[0]["prompt_tokens"],
                "cached_tokens": [r["cached_tokens"] for r in rows],
                "metrics_delta": delta(after, before),
            }
            before = after
            say(
                f"ttft {phase}: median {out['phases'][phase]['ttft_ms_median']:.1f} ms; metrics {out['phases'][phase]['metrics_delta']}"
            )
        base = out["phases"]["uncached"]["ttft_ms_median"]
        for phase in out["phases"].values():
            phase["ratio_to_uncached"] = phase["ttft_ms_median"] / base
        return out


async def throughput_part(url: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    t = time.perf_counter()
    work = []
    for i in range(args.requests):
        sizes = [rng.choice(SIZES) for _ in range(rng.randint(1, 4))]
        work.append((i, [make_image(500_000 + 10 * i + j, *s) for j, s in enumerate(sizes)]))
    gen_s = time.perf_counter() - t
    async with new_client() as client:
        before = await metrics(client, url)
        queue: asyncio.Queue[tuple[int, list[bytes]]] = asyncio.Queue()
        for item in work:
            queue.put_nowait(item)
        results: list[dict[str, Any]] = []
        errors: list[str] = []

        async def worker() -> None:
            while not queue.empty():
                i, images = queue.get_nowait()
                try:
                    r = await chat(
                        client,
                        url,
                        f"Request {i}: what is in these pictures?",
                        images,
                        "Answer briefly.",
                        args.max_tokens,
                    )
                    results.append(r | {"images": len(images)})
                except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
                    errors.append(repr(exc)[:300])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        seconds = time.perf_counter() - start
        after = await settle(client, url)
    ttfts = [r["ttft"] for r in results]
    out_tokens = sum(r["completion_tokens"] for r in results)
    return {
        "requests": len(results),
        "errors": len(errors),
        "first_errors": errors[:3],
        "images": sum(r["images"] for r in results),
        "prompt_tokens": sum(r["prompt_tokens"] for r in results),
        "output_tokens": out_tokens,
        "seconds": seconds,
        "requests_per_s": len(results) / seconds,
        "output_tok_s": out_tokens / seconds,
        "images_per_s": sum(r["images"] for r in results) / seconds,
        "ttft_ms_p50": 1e3 * pct(ttfts, 0.5),
        "ttft_ms_p99": 1e3 * pct(ttfts, 0.99),
        "latency_ms_p50": 1e3 * pct([r["latency"] for r in results], 0.5),
        "image_generation_s": gen_s,
        "metrics_delta": delta(after, before),
    }


def stack_parts(model_dir: Path, args: argparse.Namespace, log_root: Path, result: dict[str, Any]) -> None:
    """Parts 2 and 3: the vision=1 stack, then the vision=0 one."""
    for vision, label in ((1, "vision_service"), (0, "in_process")):
        if vision == 0 and "throughput" not in args.parts:
            break
        stack = start_stack(model_dir, args, vision, log_root / label)
        try:
            result["startup"][label] = stack_startup(log_root / label)
            if "ttft" in args.parts:
                result["ttft"][label] = asyncio.run(ttft_part(stack.url, args, seed=1_000_000 * (vision + 1)))
            if "throughput" in args.parts:
                result["throughput"][label] = asyncio.run(throughput_part(stack.url, args))
                r = result["throughput"][label]
                say(
                    f"throughput {label}: {r['requests_per_s']:.2f} req/s, {r['output_tok_s']:.1f} out tok/s, TTFT p50 "
                    f"{r['ttft_ms_p50']:.0f} ms p99 {r['ttft_ms_p99']:.0f} ms, {r['errors']} errors; {r['metrics_delta']}"
                )
        finally:
            result["leaked"] += stop_stack(stack)


def stack_startup(log_dir: Path) -> dict[str, str]:
    """The services' own startup lines (load times), for the record."""
    out = {}
    for path in sorted(log_dir.glob("*.log")):
        lines = [
            ln
            for ln in path.read_text(errors="replace").splitlines()
            if "ready" in ln or "loaded" in ln or "captur" in ln
        ]
        if lines:
            out[path.stem] = lines[-1][-240:]
    return out


# -- report ------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def print_table(result: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    enc = result.get("encoder")
    if enc:
        for name, s in enc["sets"].items():
            target = (
                (">= 3x: " + ("met" if s["speedup"] >= 3 else "missed"))
                if name == "realistic"
                else "(report)"
            )
            rows.append((f"encoder {name} ({s['images']} imgs, {s['image_tokens'] // s['images']} tok/img avg): batch 1 / batch {enc['batch']}",
                         f"{s['batch1_images_s']:.1f} / {s['batched_images_s']:.1f} img/s = {s['speedup']:.2f}x", target))  # fmt: skip
            rows.append(
                (
                    f"  CPU prepare (decode+resize+patch), {name}",
                    f"{s['prepare_ms_per_image']:.1f} ms/img",
                    "",
                )
            )
    for label, t in result.get("ttft", {}).items():
        p = t["phases"]
        for phase, row in p.items():
            m = row["metrics_delta"]
            enc_runs = (
                m.get("rtpllm_vision_images_encoded", 0)
                if label == "vision_service"
                else m.get("rtpllm_engine_images_encoded", 0)
            )
            hits = sum(v for k, v in m.items() if k.startswith("rtpllm_vision_cache_hits"))
            target = ""
            if phase == "embedding_cached" and label == "vision_service":
                target = "<= 0.5x: " + ("met" if row["ratio_to_uncached"] <= 0.5 else "missed")
            rows.append((f"TTFT {label}, {phase} ({row['prompt_tokens']} prompt tok)",
                         f"{row['ttft_ms_median']:.1f} ms ({row['ratio_to_uncached']:.2f}x); tower ran {enc_runs:.0f}, cache hits {hits:.0f}",
                         target))  # fmt: skip
    thr = result.get("throughput", {})
    for label, r in thr.items():
        rows.append((f"throughput {label} ({r['requests']} req, {r['images']} imgs, c={result['args']['concurrency']})",
                     f"{r['requests_per_s']:.2f} req/s, {r['output_tok_s']:.0f} tok/s, TTFT p50 {fmt(r['ttft_ms_p50'], '.0f')} / p99 {fmt(r['ttft_ms_p99'], '.0f')} ms",
                     f"{r['errors']} errors"))  # fmt: skip
    if len(thr) == 2:
        ratio = thr["vision_service"]["requests_per_s"] / thr["in_process"]["requests_per_s"]
        rows.append(("requests/s, vision service / in-process", f"{ratio:.2f}x", "(report)"))
    width = max((len(r[0]) for r in rows), default=10)
    print(
        f"\n{result['device_name']}, shape {result['args']['shape']}{', no CUDA graphs' if result['args']['no_cuda_graphs'] else ''}"
    )
    for name, value, target in rows:
        print(f"{name:{width}}  {value}  {target}".rstrip())
    if result["leaked"]:
        print(f"LEAKED processes (killed): {result['leaked']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cpu, cuda, cuda:N (every part)")
    ap.add_argument(
        "--shape",
        choices=["2b", "tiny"],
        default="2b",
        help="Qwen2-VL-2B's shape, or a tiny one for CPU smoke runs",
    )
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of: {', '.join(PARTS)}")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--seed", type=int, default=0, help="random weights (every process) and images")
    ap.add_argument("--encoder-images", type=int, default=64, help="images per set in part 1")
    ap.add_argument("--encode-batch", type=int, default=16, help="images per batched tower call in part 1")
    ap.add_argument("--encoder-reps", type=int, default=3, help="timed passes per mode (the best counts)")
    ap.add_argument(
        "--ttft-trials", type=int, default=5, help="image sets of part 2 (each request once per phase)"
    )
    ap.add_argument("--ttft-tokens", type=int, default=4, help="max_tokens of part 2's requests")
    ap.add_argument("--requests", type=int, default=64, help="requests of part 3")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent clients of part 3")
    ap.add_argument(
        "--max-tokens", type=int, default=32, help="output tokens per request of part 3 (ignore_eos)"
    )
    ap.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.5,
        help="CUDA engines' share (the vision service shares the GPU)",
    )
    ap.add_argument(
        "--no-cuda-graphs", action="store_true", help="engines without CUDA graphs (faster start)"
    )
    ap.add_argument("--engine-args", default="", help="extra flags of the engine")
    ap.add_argument("--vision-args", default="", help="extra flags of the vision service")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument(
        "--model-dir", type=Path, help="write (or reuse) the checkpoint here (default: a temporary directory)"
    )
    ap.add_argument(
        "--log-dir",
        type=Path,
        help="stack logs go to DIR/<vision_service|in_process>/ (default: a temporary directory)",
    )
    ap.add_argument(
        "--json", type=Path, help="where the JSON goes (default: $OUT/multimodal.json, else bench/results/)"
    )
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)  # `timeout` / the device tool: still stop the stacks
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="rtpllm-multimodal-"))
    model_dir = args.model_dir or tmp / f"qwen2-vl-{args.shape}"
    write_qwen2_vl_checkpoint(model_dir, args.shape)
    log_root = args.log_dir or tmp / "logs"
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "device_name": device_name(args.device),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_dir": str(model_dir),
        "log_dir": str(log_root),
        "startup": {},
        "ttft": {},
        "throughput": {},
        "leaked": [],
    }
    failed = None
    try:
        if "encoder" in args.parts:
            result["encoder"] = encoder_part(model_dir, args)
            if args.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()  # the tower's memory back before the stacks start
        if "ttft" in args.parts or "throughput" in args.parts:
            stack_parts(model_dir, args, log_root, result)
    except (Exception, KeyboardInterrupt) as exc:
        failed = f"{type(exc).__name__}: {exc}"
        result["error"] = failed
        say(f"FAILED: {failed}")
    result["seconds"] = time.perf_counter() - t_start
    out_path = args.json
    if out_path is None:
        if os.environ.get("OUT"):
            out_path = Path(os.environ["OUT"]) / "multimodal.json"
        else:
            tag = "cpu" if args.device == "cpu" else device_name(args.device).split()[-1].lower()
            out_path = (
                ROOT
                / "bench"
                / "results"
                / f"{datetime.date.today()}-{tag}"
                / f"multimodal-{args.shape}.json"
            )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(strict_json(result), indent=1) + "\n")
    say(f"wrote {out_path} ({result['seconds']:.0f} s in all)")
    print_table(result)
    return 1 if failed or result["leaked"] else 0


if __name__ == "__main__":
    sys.exit(main())
