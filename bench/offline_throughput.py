"""Offline throughput: output tok/s of the offline engine for a model and a workload.

    python bench/offline_throughput.py                       # SmolLM2 on this machine
    python bench/offline_throughput.py --model DIR --device cuda --num-prompts 256 \
        --input-len 100:1024 --output-len 256 [--load-format dummy]

Prompts are random token ids (seeded), lengths uniform in --input-len; every request
generates exactly --output-len tokens (ignore_eos), greedy unless --temperature.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from rtpllm import LLM, SamplingParams


def random_prompts(vocab: int, n: int, input_len: tuple[int, int], seed: int) -> list[list[int]]:
    """`n` prompts of random token ids, lengths uniform in `input_len` (inclusive),
    seeded: every bench that names the same workload gets the same prompts."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(*input_len))] for _ in range(n)]


def run_throughput(
    llm: LLM,
    num_prompts: int,
    input_len: tuple[int, int],
    output_len: int,
    seed: int = 0,
    temperature: float = 0.0,
    on_timed_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Generate for a seeded random workload; return counts, seconds and tok/s.
    `on_timed_start`: called after the warm-up, as the timed run starts."""
    prompts = random_prompts(llm.engine.model_config.vocab_size, num_prompts, input_len, seed)
    params = SamplingParams(temperature=temperature, seed=seed if temperature else None, max_tokens=output_len, ignore_eos=True)
    # Warm-up: kernel compilation and allocator growth stay out of the timing.
    llm.generate([p[:32] for p in prompts[: min(8, num_prompts)]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if on_timed_start is not None:
        on_timed_start()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    return {
        "requests": num_prompts,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "seconds": elapsed,
        "output_tok_per_s": out_tokens / elapsed,
        "total_tok_per_s": (in_tokens + out_tokens) / elapsed,
        "preemptions": llm.engine.stats().num_preemptions,
    }


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=parse_range, default=(100, 300), help="LO:HI tokens (uniform)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    llm = LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.input_len[1] + args.output_len + 16,
    )
    res = run_throughput(llm, args.num_prompts, args.input_len, args.output_len, args.seed, args.temperature)
    res |= {"model": args.model, "device": args.device, "date": time.strftime("%Y-%m-%d")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    print(
        f"{args.model} on {args.device}: {res['requests']} requests, {res['input_tokens']} in / {res['output_tokens']} out "
        f"tokens in {res['seconds']:.2f} s -> {res['output_tok_per_s']:.1f} output tok/s "
        f"({res['total_tok_per_s']:.1f} total tok/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
