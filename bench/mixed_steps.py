"""Decode inter-token latency while long prompts arrive (issue 23, mixed-step graphs).

Background streams decode continuously; every `--interval` seconds a `--prompt-len`-token
prompt arrives, so the steps that carry its prefill chunks also carry every stream's
decode. The same workload runs with mixed-step CUDA graphs off (those steps eager, as
before) and on (engine/piecewise_graphs.py), one engine after the other in one process.
Reported per mode: the streams' inter-token latency (p50, p90, p99, mean, max, over the
gaps between a stream's consecutive tokens), the steps that held prefill tokens, output
tok/s, and the seconds the mixed-step capture took at engine start.

Random weights (load_format="dummy"); the timeline is wall-clock, one engine driven by
its own step loop in this process (no serving layer).
Usage: python bench/mixed_steps.py --shape llama8b --out mixed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import SHAPES, make_llm, model_dir, release  # noqa: E402
from offline_throughput import random_prompts  # noqa: E402

from rtpllm import LLM, SamplingParams


def run_mode(
    llm: LLM, streams: int, stream_prompt: int, prompt_len: int, prompt_tokens_out: int, interval: float, duration: float, seed: int
) -> dict[str, Any]:
    """Drive the engine for `duration` seconds; token arrival times per stream."""
    eng = llm.engine
    vocab = eng.model_config.vocab_size
    background = random_prompts(vocab, streams, (stream_prompt, stream_prompt), seed)
    arrivals = random_prompts(vocab, int(duration / interval) + 2, (prompt_len, prompt_len), seed + 1)
    forever = SamplingParams(temperature=0, max_tokens=eng.max_model_len - stream_prompt - 1, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=prompt_tokens_out, ignore_eos=True)
    for i, prompt in enumerate(background):
        eng.add_request(f"s{i}", prompt, forever)
    # Let every stream prefill and start decoding before the clock starts.
    while sum(len(r.output_token_ids) > 2 for r in eng._requests.values()) < streams:
        eng.step()
    times: dict[str, list[float]] = {f"s{i}": [] for i in range(streams)}
    mixed_steps = steps = tokens_out = 0
    start = time.perf_counter()
    next_arrival, sent = start, 0
    now = start
    while now - start < duration:
        if now >= next_arrival:
            eng.add_request(f"p{sent}", arrivals[sent], short)
            sent += 1
            next_arrival += interval
        mixed_steps += any(r.request_id.startswith("p") and r.num_computed_tokens < r.num_prompt_tokens for r in eng._requests.values())
        outs = eng.step()
        now = time.perf_counter()
        steps += 1
        for out in outs:
            new = len(out.outputs[0].token_ids) if out.outputs else 0
            tokens_out += new
            if out.request_id in times and new:
                times[out.request_id].append(now)
    elapsed = time.perf_counter() - start
    ended = [rid for rid in times if rid not in eng._requests]
    if ended:  # a gap-free tail would make the figures those of fewer streams
        raise RuntimeError(f"streams {ended} finished before the run ended: raise --max-model-len")
    for rid in list(eng._requests):
        eng.abort_request(rid)
    while eng.has_unfinished_requests():
        eng.step()
    gaps = np.concatenate([np.diff(t) for t in times.values() if len(t) > 1]) * 1e3
    return {
        "itl_ms": {
            "p50": float(np.percentile(gaps, 50)),
            "p90": float(np.percentile(gaps, 90)),
            "p99": float(np.percentile(gaps, 99)),
            "mean": float(gaps.mean()),
            "max": float(gaps.max()),
        },
        "gaps": int(len(gaps)),
        "steps": steps,
        "steps_with_prefill": mixed_steps,
        "prompts_arrived": sent,
        "output_tok_per_s": tokens_out / elapsed,
        "seconds": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--streams", type=int, default=32, help="background decode streams")
    ap.add_argument("--stream-prompt", type=int, default=128, help="the streams' prompt length")
    ap.add_argument("--prompt-len", type=int, default=2048, help="length of each arriving prompt")
    ap.add_argument("--prompt-output", type=int, default=16, help="tokens each arriving prompt generates")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between arriving prompts")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds measured per mode")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=8192, help="the streams generate up to this length: more tokens than the run takes")
    ap.add_argument("--modes", default="eager,graphs", help="comma-separated: eager (mixed steps eager), graphs (mixed-step graphs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="rtpllm-mixed-"))
    path = model_dir(args.shape, root)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    for mode in args.modes.split(","):
        if mode not in ("eager", "graphs"):
            raise SystemExit(f"unknown mode {mode!r}: eager or graphs")
        t0 = time.perf_counter()
        llm = make_llm(
            path, args.device, max_model_len=args.max_model_len, max_num_seqs=max(64, args.streams + 8),
            max_num_batched_tokens=args.max_num_batched_tokens, mixed_cuda_graphs=mode == "graphs",
        )  # fmt: skip
        start_s = time.perf_counter() - t0
        try:
            # Warm-up: kernels for every step shape of the run compile outside the timing.
            run_mode(llm, args.streams, args.stream_prompt, args.prompt_len, args.prompt_output, args.interval, 2 * args.interval + 0.5, args.seed + 7)
            res = run_mode(llm, args.streams, args.stream_prompt, args.prompt_len, args.prompt_output, args.interval, args.duration, args.seed)
            mixed = llm.engine.runner.mixed_graphs
            res["engine_start_s"] = start_s
            res["mixed_replays"] = mixed.replays if mixed is not None else 0
        finally:
            llm.close()
            del llm
            release()
        results[mode] = res
        print(f"{mode}: {json.dumps(res)}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(f"\n{'mode':<8} {'ITL p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'tok/s':>8} {'prefill steps':>14} {'start s':>8}   ({results['device']}, {args.shape})")
    for mode in args.modes.split(","):
        r = results[mode]
        itl = r["itl_ms"]
        print(f"{mode:<8} {itl['p50']:8.2f} {itl['p90']:8.2f} {itl['p99']:8.2f} {itl['max']:8.2f} {r['output_tok_per_s']:8.0f} {r['steps_with_prefill']:>6}/{r['steps']:<7} {r['engine_start_s']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
