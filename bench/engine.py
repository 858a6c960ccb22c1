"""Engine benchmarks of issue 4, on random weights (load_format="dummy"), one process:

  latency     batch-1 decode: 128-token prompt, 256 new tokens; tok/s and achieved GB/s
  throughput  256 requests, prompt lengths uniform 100-1024 (seeded), ignore_eos
  prefill     one 4096-token prompt: time to the first token
  step        decode step time at batch 64 and 256 over 1024-token contexts vs bytes read
  all         every one of them (with --hf, the HF transformers baselines where cheap)
  profile     per-kernel GPU time of batch-1 decode steps (torch.profiler) into --profile DIR

Shapes: llama8b (Llama-3.1-8B), qwen06b (Qwen3-0.6B), qwen15b (Qwen2.5-Coder-1.5B), tiny (CPU smoke test).
Usage: python bench/engine.py all --out results.json [--hf]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import switches  # noqa: E402
import trace_gaps  # noqa: E402
from offline_throughput import random_prompts, run_throughput  # noqa: E402

from rtpllm import LLM, SamplingParams
from rtpllm.config import KV_CACHE_DTYPES
from rtpllm.loader.random_checkpoint import (
    LLAMA_3_1_8B_SHAPE,
    LLAMA_3_1_70B_SHAPE,
    QWEN2_5_1_5B_SHAPE,
    QWEN3_0_6B_SHAPE,
    TINY_SHAPE,
    make_config,
)
from rtpllm.models import ModelConfig

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama8b": ("llama", LLAMA_3_1_8B_SHAPE),
    "llama70b": ("llama", LLAMA_3_1_70B_SHAPE),
    "qwen06b": ("qwen3", QWEN3_0_6B_SHAPE),
    "qwen15b": ("qwen2", QWEN2_5_1_5B_SHAPE),
    "tiny": ("llama", TINY_SHAPE),
}
# Device-copy bandwidth measured in this workplace (bytes/s, read + write counted): the
# fallback where no GPU is present to measure it on (CPU smoke runs).
COPY_BANDWIDTH = {"H100": 3.03e12, "H200": 4.3e12}


@functools.cache
def copy_bandwidth() -> float:
    """The card's device-to-device copy bandwidth, measured now (read + write bytes per
    second of a 2 GiB copy, median of 20): the limit batch-1 decode is quoted against."""
    if not torch.cuda.is_available():
        return COPY_BANDWIDTH["H100"]
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 31) / sorted(times)[len(times) // 2]


def model_dir(shape: str, root: Path) -> Path:
    family, dims = SHAPES[shape]
    out = root / shape
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(family, **dims)
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def decisive_dummy_weights(model: torch.nn.Module) -> None:
    """Make random weights answer greedily with a wide margin, for benchmarks that compare
    greedy outputs across kernel paths (speculative verification vs one-token decode).

    Plain random weights give near-flat logits over 128k tokens: a bf16 difference
    between two kernels flips the argmax within a few tokens. Here every layer's output
    projections are scaled by 1e-3 (the residual stream stays the input embedding), the
    final norm weight is 1 and the head equals the embedding, so the next token is the
    current one by a margin of ||e||^2 against e.e' (~||e||^2 / sqrt(hidden) at most).
    Shapes, kernels and bytes read are unchanged, so timings are those of any weights.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(1e-3)
        model.norm.weight.fill_(1.0)  # type: ignore[union-attr, operator]
        if model.lm_head is not None:
            model.lm_head.weight.copy_(model.embed_tokens.weight)  # type: ignore[union-attr, operator]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def weight_bytes(cfg: ModelConfig, elem: int) -> int:
    per_layer = cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size
    per_layer += 3 * cfg.hidden_size * cfg.intermediate_size
    emb = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else emb
    # Decode reads every layer and the head once; the embedding only one row per token.
    return (cfg.num_layers * per_layer + head) * elem


def kv_bytes_per_token(cfg: ModelConfig, elem: int) -> int:
    return 2 * cfg.num_layers * cfg.kv_size * elem


def make_llm(path: Path, device: str, **kw: Any) -> LLM:
    return LLM(str(path), device=device, load_format="dummy", **kw)


def release() -> None:
    """Return the last engine's memory (CUDA graphs, KV pool) before the next one sizes its pool."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bench_latency(path: Path, device: str, prompt_len: int = 128, new_tokens: int = 256, **llm_kw: Any) -> dict[str, Any]:
    """Batch-1 decode. `llm_kw`: more engine arguments; with `tensor_parallel_size` N the
    bandwidth limit is N cards' (each reads 1/N of the weights and of the KV a token)."""
    cards = llm_kw.get("tensor_parallel_size", 1)
    llm = make_llm(path, device, max_model_len=prompt_len + new_tokens + 64, max_num_seqs=8, **llm_kw)
    try:
        cfg = llm.engine.model_config
        rng = random.Random(0)
        warm, prompt = ([rng.randrange(cfg.vocab_size) for _ in range(prompt_len)] for _ in range(2))
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        # Warm-up on another prompt: the timed one must not hit the prefix cache.
        llm.generate([warm], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        eng = llm.engine
        eng.add_request("lat", prompt, params)
        times: list[float] = []
        sync()
        start = time.perf_counter()
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.outputs[0].token_ids:
                    times.append(time.perf_counter())
        sync()
        total = time.perf_counter() - start
        # Decode rate from the first token to the last: prefill excluded, as tok/s is quoted.
        decode_s = times[-1] - times[0]
        tok_s = (new_tokens - 1) / decode_s
        elem = torch.empty((), dtype=eng.dtype).element_size()
        avg_ctx = prompt_len + new_tokens / 2
        step_bytes = weight_bytes(cfg, elem) + avg_ctx * kv_bytes_per_token(cfg, elem)
        return {
            "tok_per_s": tok_s,
            # Rank 0's graph alone would wait on the other ranks' collectives.
            "graph_replay_ms": graph_replay_ms(llm) if cards == 1 else None,
            "ttft_ms": (times[0] - start) * 1e3,
            "total_s": total,
            "load_s": eng.load_seconds,
            "achieved_GBps": step_bytes * tok_s / 1e9,
            "bandwidth_limit_tok_per_s": cards * copy_bandwidth() / step_bytes,
        }
    finally:
        llm.close()  # a tensor-parallel engine's other ranks end with it


def graph_replay_ms(llm: LLM, iters: int = 50) -> float | None:
    """GPU time of the batch-1 decode graph alone (no Python between replays): the floor
    the engine's step time is compared with."""
    graphs = llm.engine.runner.graphs
    if graphs is None:
        return None
    graph = graphs._graphs[1].graph
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def profile_decode(path: Path, device: str, out_dir: Path, steps: int = 10) -> str:
    """Per-kernel GPU time of batch-1 decode steps (torch.profiler), as a table."""
    from torch.profiler import ProfilerActivity, profile

    llm = make_llm(path, device, max_model_len=512, max_num_seqs=8)
    eng = llm.engine
    vocab = eng.model_config.vocab_size
    eng.add_request("p", [i % vocab for i in range(1000, 1128)], SamplingParams(temperature=0, max_tokens=steps + 40, ignore_eos=True))
    for _ in range(20):
        eng.step()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        sync()
    while eng.has_unfinished_requests():
        eng.step()
    prof.export_chrome_trace(str(out_dir / "decode_trace.json"))
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)


def kernel_us(events: Any) -> float:
    """The GPU kernels' own time in a profile's key averages (microseconds), as the
    table's "Self CUDA time total" counts it: a CPU op (aten::argmax) also reports its
    kernel's time as its self device time, so only the kernels' events are summed."""
    from torch.autograd import DeviceType

    return float(
        sum(
            e.self_device_time_total
            for e in events
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        )
    )


def profile_batch_decode(
    path: Path, device: str, out_dir: Path, batch: int = 256, steps: int = 10, seed: int = 0, kv_cache_dtype: str = "auto"
) -> tuple[str, dict[str, Any]]:
    """Per-kernel GPU time of pure-decode steps at the offline workload's batch: `batch`
    requests of 100..1024-token prompts (seeded), profiled once all are decoding. Also
    what says whether the step is the GPU's or the host's: the steps' wall time against
    the GPU time of their kernels (a step whose kernels take less than its wall time
    left the GPU idle: host work on the critical path)."""
    from torch.profiler import ProfilerActivity, profile

    llm = make_llm(
        path, device, max_model_len=1024 + 64 + steps, max_num_seqs=batch, max_num_batched_tokens=8192, kv_cache_dtype=kv_cache_dtype
    )  # fmt: skip
    label_phases(llm)
    try:
        eng = llm.engine
        vocab = eng.model_config.vocab_size
        rng = random.Random(seed)
        params = SamplingParams(temperature=0, max_tokens=steps + 48, ignore_eos=True)
        for i in range(batch):
            eng.add_request(f"p{i}", [rng.randrange(vocab) for _ in range(rng.randint(100, 1024))], params)
        while eng.scheduler.waiting or any(r.in_prefill for r in eng.scheduler.running):
            eng.step()
        for _ in range(8):
            eng.step()
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.profiler.record_function("timed"):
            start = time.perf_counter()
            for _ in range(steps):
                eng.step()
            sync()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
        # Unprofiled, for the step time without the profiler's own host cost.
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            eng.step()
        sync()
        plain_ms = (time.perf_counter() - start) * 1e3 / steps
        while eng.has_unfinished_requests():
            eng.step()
    finally:
        llm.close()
    gaps = gaps_of(prof, out_dir / "batch_decode_trace.json")
    events = prof.key_averages()
    gpu_us = kernel_us(events)
    summary = {"batch": batch, "steps": steps, "step_ms": plain_ms, "profiled_step_ms": wall_ms, "gpu_kernel_ms_per_step": gpu_us / 1e3 / steps}
    return events.table(sort_by="cuda_time_total", row_limit=40) + "\n\n" + gaps, summary


def profile_prefill(path: Path, device: str, out_dir: Path, prompt_len: int = 4096) -> str:
    """Per-kernel GPU time of one uncached prompt's prefill (torch.profiler), as a table."""
    from torch.profiler import ProfilerActivity, profile

    llm = make_llm(path, device, max_model_len=prompt_len + 16, max_num_batched_tokens=prompt_len, enable_prefix_caching=False)
    label_phases(llm)
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(1)
    params = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([[rng.randrange(vocab) for _ in range(prompt_len)]], params)
    prompt = [rng.randrange(vocab) for _ in range(prompt_len)]  # made outside the window (~3 ms of Python)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.profiler.record_function("timed"):
        llm.generate([prompt], params)
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    return table + "\n\n" + gaps_of(prof, out_dir / "prefill_trace.json")


def label_phases(llm: LLM) -> None:
    """Name the engine's host phases in profiler traces (record_function around the
    scheduler's `schedule`, the runner's `execute` and the engine's `_finish`), so that
    trace_gaps can say which one the GPU waited on. Bench-only: the engine is untouched."""
    eng = llm.engine
    for owner, attr, label in ((eng.scheduler, "schedule", "engine.schedule"), (eng.runner, "execute", "engine.execute"), (eng, "_finish", "engine.finish")):
        inner = getattr(owner, attr)

        def labelled(*args: Any, _inner: Callable[..., Any] = inner, _label: str = label, **kw: Any) -> Any:
            with torch.profiler.record_function(_label):
                return _inner(*args, **kw)

        setattr(owner, attr, labelled)


def gaps_of(prof: Any, trace_path: Path) -> str:
    """Export the trace and say where in the "timed" window the GPU sat idle (trace_gaps)."""
    prof.export_chrome_trace(str(trace_path))
    gaps = trace_gaps.idle_gaps(json.loads(trace_path.read_text()), window="timed", top=12)
    trace_path.with_suffix(".gaps.json").write_text(json.dumps(gaps, indent=2))
    return trace_gaps.format_gaps(gaps)


def profile_admission(
    path: Path, device: str, out_dir: Path, num_prompts: int = 32, seed: int = 0, kv_cache_dtype: str = "auto"
) -> tuple[str, dict[str, Any]]:
    """Per-op time of admitting prompts as the offline workload does (100..1024 tokens,
    new lengths, with the engine's prefill chunking), after a warm-up pass over other
    prompts of the same lengths' range: the steps with prefill tokens, each op's host
    (CPU) and GPU time, so a host-bound prompt path shows as ops whose CPU time exceeds
    the kernels'. Writes the trace and returns (table by CPU time, summary)."""
    from torch.profiler import ProfilerActivity, profile

    llm = make_llm(path, device, max_model_len=1024 + 16, max_num_seqs=256, max_num_batched_tokens=8192, kv_cache_dtype=kv_cache_dtype)
    label_phases(llm)
    try:
        vocab = llm.engine.model_config.vocab_size
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        llm.generate(random_prompts(vocab, num_prompts, (100, 1024), seed + 1), params)  # warm-up: other lengths
        prompts = random_prompts(vocab, num_prompts, (100, 1024), seed)
        sync()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.profiler.record_function("timed"):
            llm.generate(prompts, params)
            sync()
        wall_ms = (time.perf_counter() - start) * 1e3
        again = random_prompts(vocab, num_prompts, (100, 1024), seed + 2)
        sync()
        start = time.perf_counter()
        llm.generate(again, params)
        sync()
        plain_ms = (time.perf_counter() - start) * 1e3
    finally:
        llm.close()
    gaps = gaps_of(prof, out_dir / "admission_trace.json")
    events = prof.key_averages()
    gpu_us = kernel_us(events)
    summary = {
        "prompts": num_prompts,
        "prompt_tokens": sum(len(p) for p in prompts),
        "kv_cache_dtype": kv_cache_dtype,
        "profiled_ms": wall_ms,
        "unprofiled_ms": plain_ms,
        "gpu_kernel_ms": gpu_us / 1e3,
    }
    tables = events.table(sort_by="cpu_time_total", row_limit=40) + "\n" + events.table(sort_by="cuda_time_total", row_limit=25)
    return tables + "\n\n" + gaps, summary


def step_timeline(llm: LLM) -> tuple[Callable[[], dict[str, Any]], Callable[[], None]]:
    """Record every step the engine's runner launches: its tokens, its decode rows and the
    wall time to the next launch (with async scheduling, the slower of the CPU's work on
    a step and the GPU's). Returns (summary, reset): the summary of the steps since the
    last reset, split into pure-decode steps and steps with prefill tokens (the last
    step, with no next launch, is left out)."""
    runner = llm.engine.runner
    execute = runner.execute
    marks: list[tuple[float, int, int]] = []

    def timed(step: Any, prev: Any = None) -> Any:
        marks.append((time.perf_counter(), step.num_tokens, step.num_decodes))
        return execute(step, prev)

    runner.execute = timed  # type: ignore[method-assign]

    def summary() -> dict[str, Any]:
        out: dict[str, Any] = {}
        steps = [(t1 - t0, tokens, decodes) for (t0, tokens, decodes), (t1, _, _) in zip(marks, marks[1:], strict=False)]
        for kind, chosen in (("decode", [s for s in steps if s[1] == s[2]]), ("prefill", [s for s in steps if s[1] > s[2]])):
            if not chosen:
                continue
            secs = sum(s[0] for s in chosen)
            out[kind] = {
                "steps": len(chosen),
                "seconds": secs,
                "mean_ms": 1e3 * secs / len(chosen),
                "mean_tokens": sum(s[1] for s in chosen) / len(chosen),
                "mean_decode_rows": sum(s[2] for s in chosen) / len(chosen),
                "tokens_per_s": sum(s[1] for s in chosen) / secs,
            }
        return out

    return summary, marks.clear


def bench_throughput(
    path: Path,
    device: str,
    num_requests: int,
    output_len: int,
    seed: int = 0,
    input_len: tuple[int, int] = (100, 1024),
    timeline: bool = False,
    passes: int = 1,
    **llm_kw: Any,
) -> dict[str, Any]:
    """`llm_kw`: more engine arguments (tensor_parallel_size, ...). `timeline`: also the
    steps' split into decode and prefill time (`step_timeline`). `passes` > 1: the
    workload again in the same engine, each time with new prompts (seed + pass), so a
    cost paid once per process (a kernel's compile, a per-shape plan) shows as the first
    pass's excess; the result is the first pass's, the later ones under "passes"."""
    llm = make_llm(path, device, max_model_len=input_len[1] + output_len + 16, max_num_seqs=256, max_num_batched_tokens=8192, **llm_kw)
    try:
        summary, reset = step_timeline(llm) if timeline else (None, None)
        runs = []
        for i in range(passes):
            run = run_throughput(llm, num_requests, input_len, output_len, seed + i, on_timed_start=reset)
            if summary is not None:
                run["timeline"] = summary()
            runs.append(run)
        res = runs[0]
        if passes > 1:
            res["passes"] = runs[1:]
        res["kv_blocks"] = llm.engine.block_manager.num_blocks
    finally:
        llm.close()  # a tensor-parallel engine's other ranks end with it
    return res


def bench_prefill(path: Path, device: str, prompt_len: int = 4096, repeats: int = 5) -> dict[str, Any]:
    """One uncached prompt's prefill (one output token): wall time, and where it goes:
    the host's work before the forward pass is launched, the forward's device time
    (CUDA events around the runner's batch) and the rest (sampling, read-back, output),
    each the median over the repeats; no profiler, so no profiler overhead."""
    llm = make_llm(path, device, max_model_len=prompt_len + 16, max_num_batched_tokens=prompt_len, enable_prefix_caching=False)
    marks = time_forward(llm)
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=1)
    samples: list[float] = []
    phases: list[tuple[float, float]] = []
    for i in range(repeats + 1):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        sync()
        marks.clear()
        start = time.perf_counter()
        llm.generate([prompt], params)
        sync()
        wall = time.perf_counter() - start
        if i:  # the first run compiles kernels
            samples.append(wall)
            if marks:
                phases.append((marks[0].entered - start, marks[0].device_seconds()))
    samples.sort()
    res: dict[str, Any] = {"prompt_tokens": prompt_len, "median_ms": samples[len(samples) // 2] * 1e3, "min_ms": samples[0] * 1e3}
    if phases:
        host = sorted(h for h, _ in phases)[len(phases) // 2]
        forward = sorted(f for _, f in phases)[len(phases) // 2]
        res.update(
            host_before_forward_ms=host * 1e3,
            forward_device_ms=forward * 1e3,
            rest_ms=res["median_ms"] - (host + forward) * 1e3,
            # In run order: a forward that slows over back-to-back runs is the card's
            # clocks (power or heat), not the code.
            forward_device_ms_runs=[round(f * 1e3, 2) for _, f in phases],
        )
    return res


@dataclass
class ForwardMark:
    """When the host entered and left the runner's batch, and CUDA events around its
    device work (None on the CPU, where the forward runs while the host waits)."""

    entered: float
    returned: float
    begin: Any
    end: Any

    def device_seconds(self) -> float:
        if self.begin is None:
            return self.returned - self.entered
        return self.begin.elapsed_time(self.end) / 1e3


def time_forward(llm: LLM) -> list[ForwardMark]:
    """Mark each `run_batch` of the runner (bench-only wrapper): the host clock at entry and,
    on CUDA, events recorded on entry and on return. The device is idle at entry when the
    step runs alone (a prefill), so the events span the forward's device time, its
    uploads included."""
    runner = llm.engine.runner
    inner = runner.run_batch
    marks: list[ForwardMark] = []
    cuda = torch.cuda.is_available()

    def marked(*args: Any, **kw: Any) -> Any:
        begin = end = None
        entered = time.perf_counter()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        out = inner(*args, **kw)
        if cuda:
            end.record()
        marks.append(ForwardMark(entered, time.perf_counter(), begin, end))
        return out

    runner.run_batch = marked
    return marks


def bench_step(path: Path, device: str, batch: int, ctx: int = 1024, steps: int = 32) -> dict[str, Any]:
    llm = make_llm(path, device, max_model_len=ctx + steps + 64, max_num_seqs=batch, max_num_batched_tokens=16384)
    eng = llm.engine
    cfg = eng.model_config
    rng = random.Random(batch)
    for i in range(batch):
        eng.add_request(f"s{i}", [rng.randrange(cfg.vocab_size) for _ in range(ctx)], SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
    # Run until every request is decoding, then time pure decode steps.
    while eng.scheduler.waiting or any(r.in_prefill for r in eng.scheduler.running):
        eng.step()
    for _ in range(4):
        eng.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        eng.step()
    sync()
    step_s = (time.perf_counter() - start) / steps
    elem = torch.empty((), dtype=eng.dtype).element_size()
    read = weight_bytes(cfg, elem) + batch * (ctx + 8) * kv_bytes_per_token(cfg, elem)
    res = {
        "batch": batch,
        "context": ctx,
        "step_ms": step_s * 1e3,
        "bytes_per_step_GB": read / 1e9,
        "achieved_GBps": read / step_s / 1e9,
        "pct_of_copy_bandwidth": 100 * read / step_s / copy_bandwidth(),
        "tok_per_s": batch / step_s,
    }
    while eng.has_unfinished_requests():
        eng.step()
    return res


def hf_baselines(path: Path, device: str, new_tokens: int = 256) -> dict[str, Any]:
    """HF transformers eager: batch-1 decode tok/s and a 4096-token prefill, same weights shape."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.eval()
    vocab = cfg.vocab_size
    prompt = torch.randint(0, vocab, (1, 128), device=device)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        sync()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync()
        decode = new_tokens / (time.perf_counter() - start)
        long = torch.randint(0, vocab, (1, 4096), device=device)
        model(long)
        sync()
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            model(long, logits_to_keep=1)
            sync()
            times.append(time.perf_counter() - t0)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"hf_decode_tok_per_s": decode, "hf_prefill_4096_ms": sorted(times)[1] * 1e3}


def hf_generate_batch(path: Path, device: str, num_requests: int, output_len: int, seed: int = 0) -> dict[str, Any]:
    """HF transformers continuous batching (`generate_batch`, paged SDPA) on the offline
    workload's prompts (inputs 100-1024, the same seeded prompts; greedy). Output
    tok/s counts the tokens it generated (random weights rarely stop early)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.generation import GenerationConfig

    cfg = AutoConfig.from_pretrained(path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="paged|sdpa")
    model.eval()
    prompts = random_prompts(cfg.vocab_size, num_requests, (100, 1024), seed)

    def greedy(tokens: int) -> GenerationConfig:  # eos -1: every request runs to its length
        return GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)

    with torch.no_grad():
        model.generate_batch(inputs=[p[:32] for p in prompts[:8]], generation_config=greedy(4), progress_bar=False)
        sync()
        start = time.perf_counter()
        outs = model.generate_batch(inputs=prompts, generation_config=greedy(output_len), progress_bar=False)
        sync()
        elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.generated_tokens) for o in outs.values())
    del model
    release()
    return {"requests": num_requests, "output_tokens": out_tokens, "seconds": elapsed, "output_tok_per_s": out_tokens / elapsed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["latency", "throughput", "prefill", "step", "all", "profile", "profile-prefill", "profile-batch", "profile-admission"])
    ap.add_argument("--shape", default=None, help="override the model shape (llama8b, qwen06b, tiny)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hf", action="store_true", help="also run the HF transformers baselines")
    ap.add_argument("--hf-batch", type=int, default=0, metavar="N", help="throughput: also HF generate_batch on N requests of each workload")
    ap.add_argument("--prefill-lens", type=int, nargs="+", default=[4096], help="prefill: prompt lengths")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and counts (CPU check of the script)")
    ap.add_argument(
        "--mixed-cuda-graphs", action=argparse.BooleanOptionalAction,
        help="throughput: steps with prefill tokens replay piecewise graphs, or run eagerly (default: the engine's, on)",
    )  # fmt: skip
    ap.add_argument(
        "--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
        help="throughput, profile-batch, profile-admission: the KV cache's format (default: the engine's, the model's dtype)",
    )  # fmt: skip
    ap.add_argument(
        "--workloads", nargs="+", default=["big", "small"], choices=["big", "small"],
        help="throughput: the 8B-shape workload (256 out), the 0.6B-shape one (512 out), or both",
    )  # fmt: skip
    ap.add_argument("--timeline", action="store_true", help="throughput: also the time in decode steps and in steps with prefill tokens")
    ap.add_argument("--passes", type=int, default=1, help="throughput: run each workload this many times in one engine (new prompts each time); the first is the result")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--profile", default=None, help="directory: write a batch-1 decode profile (table + trace) there")
    switches.add_argument(ap)
    args = ap.parse_args(argv)
    changed = switches.apply(args.set)
    root = Path(tempfile.mkdtemp(prefix="rtpllm-bench-"))
    big = args.shape or ("tiny" if args.smoke else "llama8b")
    small = args.shape or ("tiny" if args.smoke else "qwen06b")
    n_req = 8 if args.smoke else 256
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d")}
    if changed:
        results["switches"] = changed
    if args.device == "cuda":
        results["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
        print(f"copy bandwidth: {results['copy_bandwidth_GBps']:.0f} GB/s", flush=True)
    rows: list[tuple[str, str]] = []

    def record(name: str, res: dict[str, Any], summary: str) -> None:
        release()
        results[name] = res
        rows.append((name, summary))
        print(f"{name}: {json.dumps(res)}", flush=True)

    if args.what in ("latency", "all"):
        r = bench_latency(model_dir(big, root), args.device, new_tokens=32 if args.smoke else 256)
        record(f"latency[{big}]", r, f"{r['tok_per_s']:.1f} tok/s, {r['achieved_GBps']:.0f} GB/s (limit {r['bandwidth_limit_tok_per_s']:.0f} tok/s; graph alone {r['graph_replay_ms']} ms)")
    if args.what in ("prefill", "all"):
        for length in [256] if args.smoke else args.prefill_lens:
            r = bench_prefill(model_dir(big, root), args.device, prompt_len=length)
            split = f" (host before forward {r['host_before_forward_ms']:.1f}, forward {r['forward_device_ms']:.1f}, rest {r['rest_ms']:.1f})" if "rest_ms" in r else ""
            record(f"prefill[{big},{length}]", r, f"{r['median_ms']:.1f} ms for {r['prompt_tokens']} tokens{split}")
    if args.what in ("step", "all"):
        for batch in (4, 8) if args.smoke else (64, 256):
            r = bench_step(model_dir(big, root), args.device, batch, ctx=64 if args.smoke else 1024, steps=8 if args.smoke else 32)
            record(f"step[{big},b{batch}]", r, f"{r['step_ms']:.2f} ms, {r['achieved_GBps']:.0f} GB/s = {r['pct_of_copy_bandwidth']:.0f}% of copy bw")
    if args.what in ("throughput", "all"):
        engine_kw: dict[str, Any] = {"timeline": args.timeline, "passes": args.passes}
        if args.mixed_cuda_graphs is not None:
            engine_kw["mixed_cuda_graphs"] = args.mixed_cuda_graphs
        results["mixed_cuda_graphs"] = args.mixed_cuda_graphs
        if args.kv_cache_dtype is not None:
            engine_kw["kv_cache_dtype"] = args.kv_cache_dtype
        results["kv_cache_dtype"] = args.kv_cache_dtype
        kv = f",{args.kv_cache_dtype}" if args.kv_cache_dtype else ""
        for workload in args.workloads:
            shape, out_len = (big, 256) if workload == "big" else (small, 512)
            r = bench_throughput(model_dir(shape, root), args.device, n_req, 16 if args.smoke else out_len, **engine_kw)
            later = "".join(f", pass {i + 2}: {p['output_tok_per_s']:.0f}" for i, p in enumerate(r.get("passes", [])))
            record(f"throughput[{shape}{kv}]", r, f"{r['output_tok_per_s']:.0f} output tok/s ({r['seconds']:.1f} s){later}")
        if args.hf_batch:
            for shape, out_len in ((big, 16 if args.smoke else 256), (small, 16 if args.smoke else 512)):
                try:
                    r = hf_generate_batch(model_dir(shape, root), args.device, args.hf_batch, out_len)
                    record(f"hf_generate_batch[{shape}]", r, f"{r['output_tok_per_s']:.0f} output tok/s ({r['requests']} requests, {r['seconds']:.1f} s)")
                except Exception as exc:  # a transformers without it: say so, keep the rest
                    record(f"hf_generate_batch[{shape}]", {"error": repr(exc)[:300]}, f"error: {exc!r}"[:200])
    if args.hf:
        r = hf_baselines(model_dir(big, root), args.device, new_tokens=16 if args.smoke else 256)
        record(f"hf[{big}]", r, f"decode {r['hf_decode_tok_per_s']:.1f} tok/s, prefill 4096 {r['hf_prefill_4096_ms']:.0f} ms")
    if args.what == "profile-prefill":
        out_dir = Path(args.profile or ".")
        table = profile_prefill(model_dir(big, root), args.device, out_dir, prompt_len=256 if args.smoke else args.prefill_lens[0])
        (out_dir / "prefill_profile.txt").write_text(table)
        print(table)
    elif args.what == "profile-batch":
        out_dir = Path(args.profile or ".")
        table, summary = profile_batch_decode(
            model_dir(small, root), args.device, out_dir, batch=8 if args.smoke else 256, steps=3 if args.smoke else 10,
            kv_cache_dtype=args.kv_cache_dtype or "auto",
        )  # fmt: skip
        (out_dir / "batch_decode_profile.txt").write_text(table)
        print(table)
        record(f"profile-batch[{small}]", summary, f"{summary['step_ms']:.2f} ms a step, kernels {summary['gpu_kernel_ms_per_step']:.2f} ms")
    elif args.what == "profile-admission":
        out_dir = Path(args.profile or ".")
        table, summary = profile_admission(
            model_dir(small, root), args.device, out_dir, num_prompts=4 if args.smoke else 32, kv_cache_dtype=args.kv_cache_dtype or "auto"
        )  # fmt: skip
        (out_dir / f"admission_profile_{args.kv_cache_dtype or 'auto'}.txt").write_text(table)
        print(table)
        record(f"profile-admission[{small}]", summary, f"{summary['unprofiled_ms']:.0f} ms for {summary['prompt_tokens']} prompt tokens, kernels {summary['gpu_kernel_ms']:.0f} ms")
    elif args.what == "profile" or args.profile:
        args.profile = args.profile or "."
        table = profile_decode(model_dir(big, root), args.device, Path(args.profile))
        (Path(args.profile) / "decode_profile.txt").write_text(table)
        print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{'benchmark':<28} result   ({results['device']}, {results['date']})")
    for name, summary in rows:
        print(f"{name:<28} {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
