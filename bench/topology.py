"""Aggregated workers against the prefill/decode split, as `rtpllm up` starts them, on
this machine: which topology serves a mixed load better here.

    python bench/topology.py [--model smollm2-135m-instruct] [--device cpu] [--out topo.json]

Each configuration is a fresh stack (nats, the kvstore, engines, gateway; no Redis) on
loopback. The load: `--requests` chat requests at once, a quarter with long prompts
(over the 512-token local-prefill threshold, so the split hands them to the prefill
instance) and the rest short, each generating `--max-tokens` tokens, streamed.
Reported: output tokens/s, TTFT (mean, p90) of short and long requests, and ITL p90 of
the short ones (what a long prompt's prefill does to the others' decoding).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "libs"))

import openai  # noqa: E402

from rtpllm.models.registry import resolve_model, served_model_name  # noqa: E402
from rtpllm.runtime.stack import Stack, StackConfig  # noqa: E402

CONFIGS = {
    "aggregated, 1 worker (--workers 1)": {"workers": 1},
    "split, 1 prefill + 1 decode (default)": {"prefill": 1, "decode": 1},
    "aggregated, 2 workers (--workers 2)": {"workers": 2},
}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    arrivals: list[float] = []
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
    return {
        "ttft": arrivals[0] - start if arrivals else float("nan"),
        "itl": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)],
        "tokens": len(arrivals),
    }


async def load(url: str, api_key: str | None, model: str, requests: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=600)
    word = "lorem ipsum dolor sit amet consectetur "
    prompts = [
        (i % 4 == 0, f"{i}: " + (word * 150 if i % 4 == 0 else word * 8) + "Summarize.") for i in range(requests)
    ]
    start = time.perf_counter()
    async with client:  # closed inside this loop (else its cleanup runs after the loop closed)
        results = await asyncio.gather(*(one_request(client, model, p, max_tokens) for _, p in prompts))
    elapsed = time.perf_counter() - start
    long_ttft = [r["ttft"] for (is_long, _), r in zip(prompts, results, strict=True) if is_long]
    short = [r for (is_long, _), r in zip(prompts, results, strict=True) if not is_long]
    short_itl = [x for r in short for x in r["itl"]]
    return {
        "output_tok_s": round(sum(r["tokens"] for r in results) / elapsed, 1),
        "ttft_short_mean_s": round(statistics.mean(r["ttft"] for r in short), 3),
        "ttft_short_p90_s": round(pct([r["ttft"] for r in short], 0.9), 3),
        "ttft_long_mean_s": round(statistics.mean(long_ttft), 3),
        "itl_short_p90_ms": round(1000 * pct(short_itl, 0.9), 1),
        "elapsed_s": round(elapsed, 1),
    }


def run_config(model_dir: Path, served: str, device: str, shape: dict, requests: int, max_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as logs:
        stack = Stack(
            StackConfig(
                model=str(model_dir), served_model_name=served, use_redis=False, kvstore=True,
                worker_args=["--kvstore", "--device", device], log_dir=Path(logs), **shape,
            )
        )  # fmt: skip
        try:
            stack.start()
            stack.wait_ready(timeout=300)
            asyncio.run(load(stack.url, stack.api_key, served, 2, 4))  # warm-up
            return asyncio.run(load(stack.url, stack.api_key, served, requests, max_tokens))
        finally:
            stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    served = served_model_name(args.model)
    rows = {}
    for name, shape in CONFIGS.items():
        rows[name] = run_config(model_dir, served, args.device, shape, args.requests, args.max_tokens)
        print(name, json.dumps(rows[name]), flush=True)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "args": vars(args) | {"out": str(args.out)},
        "results": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'topology':42} {'tok/s':>7} {'TTFT short':>11} {'TTFT long':>10} {'ITL p90':>8}")
    for name, r in rows.items():
        print(f"{name:42} {r['output_tok_s']:7.1f} {r['ttft_short_mean_s']:10.2f}s {r['ttft_long_mean_s']:9.2f}s {r['itl_short_p90_ms']:6.0f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
