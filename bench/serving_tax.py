"""The serving tax: output tok/s through gateway -> NATS -> worker against the offline
engine, on the same prompts, engine settings and machine (issue 23).

    python bench/serving_tax.py                       # SmolLM2 on this CPU: 64 x 256 in / 64 out
    python bench/serving_tax.py --device cuda --shape llama8b --num-prompts 256 \
        --input-len 100:1024 --output-len 256        # the GPU line of issue 23

Workload: --num-prompts prompts of random token ids (seeded; lengths uniform in
--input-len), each generating exactly --output-len tokens (ignore_eos, greedy).

1. offline: `LLM(model).generate(prompts)` in this process (after a short warm-up), then
   the engine is freed.
2. serving: a stack (nats-server, one worker, the gateway; no Redis, no auth) started
   with the same engine flags, and an SGLang-style client in this process: every
   request sent at once (unlimited rate), streamed `/v1/completions` with the prompt as
   token ids. Output tok/s = output tokens / (last byte - first send); TTFT and ITL
   (gaps between content chunks) p50/p99 per request.

The figure is serving / offline output tok/s (target: >= 0.75 on the 2-core CPU
machine, >= 0.9 on a GPU). On a CPU the client, the gateway, nats-server and the worker
share the cores with the engine: the CPU seconds of each process (engine, worker,
gateway, nats-server, the client) say where the cores went.
Reported as a table and as JSON (--out, else $OUT/serving_tax.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from offline_throughput import parse_range, random_prompts
from serving_bench import StreamLog, completion_body, new_client, pct, stream_request, strict_json

from rtpllm import LLM, SamplingParams
from rtpllm.loader.random_checkpoint import LLAMA_3_1_8B_SHAPE, make_config
from rtpllm.runtime.stack import Stack, StackConfig
from rtpllm.tokenizer.byte_tokenizer import write_byte_tokenizer

SERVED_NAME = "bench"


def shaped_model_dir(root: Path, max_len: int) -> Path:
    """config.json of Llama-3.1-8B's shape and a byte tokenizer, for --load-format dummy."""
    cfg = make_config("llama", **{**LLAMA_3_1_8B_SHAPE, "max_position_embeddings": max_len})
    cfg["torch_dtype"] = "bfloat16"
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    write_byte_tokenizer(root, cfg["vocab_size"])
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg["eos_token_id"]}))
    return root


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device": args.device,
        "dtype": args.dtype,
        "load_format": args.load_format,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.input_len[1] + args.output_len + 16,
        "seed": 0,
    }


def engine_flags(kwargs: dict[str, Any]) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]


# -- offline ------------------------------------------------------------------------------------


def run_offline(model: str, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    llm = LLM(model, **engine_kwargs(args))
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([p[:32] for p in prompts[:8]], warm)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    sync()
    t0, cpu0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    sync()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm, outs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "seconds": seconds,
        "output_tokens": out_tokens,
        "output_tok_per_s": out_tokens / seconds,
        "cpu_s": {"engine": cpu},
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- serving ------------------------------------------------------------------------------------


async def load(url: str, prompts: list[list[int]], output_len: int) -> list[StreamLog]:
    payloads = [completion_body(SERVED_NAME, p, output_len, usage=True) for p in prompts]  # before the clock starts
    async with new_client() as client:
        warm = [completion_body(SERVED_NAME, p[:32], 2) for p in prompts[:4]]
        await asyncio.gather(*(stream_request(client, url, body, StreamLog(0.0)) for body in warm))
        logs = [StreamLog(0.0) for _ in prompts]

        async def one(i: int) -> None:
            logs[i].sent = time.perf_counter()
            await stream_request(client, url, payloads[i], logs[i])

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return logs


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (their threads included)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def run_serving(model: str, prompts: list[list[int]], args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    kwargs = engine_kwargs(args)
    config = StackConfig(
        model=model,
        served_model_name=SERVED_NAME,
        workers=1,
        worker_args=engine_flags(kwargs) + shlex.split(args.engine_args),
        gateway_args=["--max-running", "4096", "--max-queue", "4096"],
        log_dir=log_dir,
        use_redis=False,
        auth=False,  # the client sends no API key
        role_env={"worker": dict(kv.split("=", 1) for kv in args.worker_env)},
    )
    stack = Stack(config)
    try:
        stack.start_infra()
        stack.add_worker()
        stack.start_gateway()
        stack.wait_ready(args.ready_timeout)
        roles = {"worker": stack.workers[0].pid, "gateway": stack.gateway.pid, "nats": stack.nats.pid}
        cpu0, t0, client0 = {r: cpu_seconds([p]) for r, p in roles.items()}, time.perf_counter(), time.process_time()
        logs = asyncio.run(load(f"{stack.url}/v1/completions", prompts, args.output_len))
        cpu = {r: cpu_seconds([p]) - cpu0[r] for r, p in roles.items()} | {"client": time.process_time() - client0}
    finally:
        stack.stop()
    errors = [log.error for log in logs if log.error]
    done = [log for log in logs if not log.error and log.chunks]
    end = max((log.chunks[-1] for log in done), default=t0)
    start = min(log.sent for log in logs)
    seconds = end - start
    out_tokens = sum(log.completion_tokens for log in done)
    ttft = [(log.chunks[0] - log.sent) * 1e3 for log in done]
    itl = [(b - a) * 1e3 for log in done for a, b in zip(log.chunks, log.chunks[1:], strict=False)]
    return {
        "seconds": seconds,
        "output_tokens": out_tokens,
        "output_tok_per_s": out_tokens / seconds if seconds > 0 else 0.0,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "ttft_ms": {"mean": sum(ttft) / max(1, len(ttft)), "p50": pct(ttft, 0.5), "p99": pct(ttft, 0.99)},
        "itl_ms": {"mean": sum(itl) / max(1, len(itl)), "p50": pct(itl, 0.5), "p99": pct(itl, 0.99)},
        "cpu_s": cpu,
    }


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--shape", choices=["llama8b"], help="random weights of this shape (--load-format dummy)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=parse_range, default=(256, 256), help="LO:HI tokens (uniform)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--engine-args", default="", help="extra worker flags (serving side only)")
    ap.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE", help="environment of the worker (repeatable)")
    ap.add_argument("--only", choices=["offline", "serving"], help="one side only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--log-dir", type=Path, help="stack logs (default: a temporary directory)")
    ap.add_argument("--out", type=Path, help="JSON result (default: $OUT/serving_tax.json when $OUT is set)")
    args = ap.parse_args(argv)
    if args.shape:
        args.load_format = "dummy"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model
    if args.shape:
        model = str(shaped_model_dir(Path(tempfile.mkdtemp(prefix="rtpllm-shape-")), args.input_len[1] + args.output_len + 16))
    from rtpllm.models.config import ModelConfig  # noqa: PLC0415 - after the model dir exists
    from rtpllm.models.registry import resolve_model  # noqa: PLC0415

    vocab = ModelConfig.from_dir(resolve_model(model)).vocab_size
    prompts = random_prompts(vocab, args.num_prompts, args.input_len, args.seed)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="rtpllm-serving-tax-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores",
        "model": args.shape or args.model,
        "workload": {"prompts": args.num_prompts, "input_len": list(args.input_len), "output_len": args.output_len},
        "engine": engine_kwargs(args),
    }
    if args.only != "serving":
        result["offline"] = run_offline(model, prompts, args)
        print(f"offline: {result['offline']['output_tok_per_s']:.1f} output tok/s", flush=True)
    if args.only != "offline":
        result["serving"] = run_serving(model, prompts, args, log_dir)
        print(f"serving: {result['serving']['output_tok_per_s']:.1f} output tok/s", flush=True)
    if "offline" in result and "serving" in result:
        result["ratio"] = result["serving"]["output_tok_per_s"] / result["offline"]["output_tok_per_s"]
    out = args.out or (Path(os.environ["OUT"]) / "serving_tax.json" if os.environ.get("OUT") else None)
    if out:
        out.write_text(json.dumps(strict_json(result), indent=2))
    print_table(result)
    return 1 if result.get("serving", {}).get("errors") else 0


def print_table(result: dict[str, Any]) -> None:
    w = result["workload"]
    print(f"\n{result['model']} on {result['machine']}, {w['prompts']} x {w['input_len']} in / {w['output_len']} out")
    print(f"{'path':<8} {'out tok/s':>10} {'seconds':>8} {'TTFT p50/p99 ms':>18} {'ITL p50/p99 ms':>16}  CPU seconds")
    if "offline" in result:
        o = result["offline"]
        print(f"{'offline':<8} {o['output_tok_per_s']:>10.1f} {o['seconds']:>8.2f} {'':>18} {'':>16}  {cpu_text(o['cpu_s'])}")
    if "serving" in result:
        s = result["serving"]
        ttft = f"{s['ttft_ms']['p50']:.0f}/{s['ttft_ms']['p99']:.0f}"
        itl = f"{s['itl_ms']['p50']:.1f}/{s['itl_ms']['p99']:.1f}"
        print(f"{'serving':<8} {s['output_tok_per_s']:>10.1f} {s['seconds']:>8.2f} {ttft:>18} {itl:>16}  {cpu_text(s['cpu_s'])}")
        if s["errors"]:
            print(f"{s['errors']} requests failed; first: {s['first_error']}")
    if "ratio" in result:
        print(f"serving / offline: {result['ratio']:.2f}x")


def cpu_text(cpu: dict[str, float]) -> str:
    return " ".join(f"{role} {seconds:.1f}" for role, seconds in cpu.items())


if __name__ == "__main__":
    sys.exit(main())
