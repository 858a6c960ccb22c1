"""Tensor parallelism on the GPUs of one host (issue 20), random weights, one run:

  decode8b    Llama-3.1-8B shape, batch-1 decode at TP=1 and TP=N: tok/s and the speedup
  allreduce   the all-reduces of one batch-1 decode step at TP=N, timed apart: two per
              layer of [1, hidden] (attention and MLP outputs), one all-gather of the
              vocab-parallel logits; milliseconds per step
  decode70b   Llama-3.1-70B shape, batch-1 decode at TP=N against the bandwidth limit of
              N cards (each reads 1/N of the weights and of the KV)
  offline70b  128 requests, inputs 100-1024, outputs 256, at TP=N
  load70b     load time at TP=N from a warm page cache: a random checkpoint is written to
              --ckpt-dir (tmpfs by default: 141 GB for 70B), read once, then loaded
  check       TP=N greedy equals TP=1 on the 8B shape, CUDA graphs on, from one written
              checkpoint (a difference is allowed only at a near-tie of TP=1's logits)

Usage (2 GPUs): python bench/tensor_parallel.py decode8b allreduce check --out tp.json
                python bench/tensor_parallel.py decode70b offline70b load70b --out tp70.json
CPU check of the script (gloo, tiny shape): python bench/tensor_parallel.py all --smoke
The 70B shape needs two 141 GB cards (H200); an H100 pair holds only the 8B phases.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import SHAPES, bench_latency, bench_throughput, model_dir, release  # noqa: E402

from rtpllm import LLM, SamplingParams
from rtpllm.loader.random_checkpoint import make_config, weight_specs, write_byte_tokenizer
from rtpllm.models import ModelConfig

PHASES = ("decode8b", "allreduce", "decode70b", "offline70b", "load70b", "check")
TIE_GAP = {torch.bfloat16: 0.25, torch.float32: 1e-3}  # as tests/gpu/test_model_triton.py
SHARD_BYTES = 4 << 30


def write_checkpoint(out: Path, shape: dict[str, Any], dtype: torch.dtype, seed: int = 0, std: float = 0.02) -> Path:
    """A random Llama checkpoint in HF layout, written tensor by tensor into ~4 GB shards
    (the whole 70B never sits in host memory at once; rtpllm.loader.random_checkpoint
    holds a whole model); random numbers come from the GPU where there is one. std 0.02
    keeps activations in range across 80 layers; norms are ones."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config("llama", **shape)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_byte_tokenizer(out, cfg["vocab_size"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, dims, kind in weight_specs(cfg):
        if kind == "norm":
            t = torch.ones(dims, dtype=dtype)
        else:
            scale = 1.0 if kind == "embed" else std
            t = (torch.randn(dims, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype).cpu()
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": sum((out / f).stat().st_size for f in files)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def decode_run(path: Path, device: str, tp: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """Batch-1 decode at TP=tp (bench/engine.py's latency run): tok/s and the share of
    the `tp` cards' bandwidth limit."""
    res = {"tp": tp, **bench_latency(path, device, prompt_len, new_tokens, tensor_parallel_size=tp)}
    if device.startswith("cuda"):
        res["pct_of_limit"] = 100 * res["tok_per_s"] / res["bandwidth_limit_tok_per_s"]
    release()
    return res


def _allreduce_worker(rank: int, n: int, port: int, backend: str, hidden: int, vocab: int, layers: int, iters: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=n)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if backend == "nccl" else torch.float32
    x = torch.randn(1, hidden, device=device, dtype=dtype)
    part = torch.randn(1, vocab // n, device=device, dtype=dtype)
    gathered = [torch.empty_like(part) for _ in range(n)]

    def step() -> None:
        for _ in range(2 * layers):
            dist.all_reduce(x)
        dist.all_gather(gathered, part)

    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        if backend == "nccl":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        step()
        if backend == "nccl":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(sorted(times)[len(times) // 2] * 1e3)
    dist.destroy_process_group()


def allreduce_step_ms(n: int, cfg: ModelConfig, device: str, iters: int = 20) -> dict[str, Any]:
    """The collectives of one batch-1 decode step at TP=n, as their own processes (eager
    launches; in a CUDA graph the launch cost is lower): median milliseconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.startswith("cuda") else "gloo"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    args = (n, port, backend, cfg.hidden_size, cfg.vocab_size, cfg.num_layers, iters, q)
    procs = [ctx.Process(target=_allreduce_worker, args=(r, *args)) for r in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"all-reduce workers failed: exit codes {[p.exitcode for p in procs]}")
    ms = q.get(timeout=5)
    return {"tp": n, "backend": backend, "collectives_per_step": 2 * cfg.num_layers + 1, "ms_per_step": ms}


def check_greedy(path: Path, device: str, tp: int, dtype: torch.dtype, new_tokens: int) -> dict[str, Any]:
    """TP=tp against TP=1 on the same checkpoint: greedy tokens equal, or the first
    difference sits at a near-tie (top-2 gap <= TIE_GAP) of TP=1's logits."""
    rng = random.Random(1)
    vocab = ModelConfig.from_dir(path).vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (7, 60, 300, 900)]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=2)
    runs = {}
    for size in sorted({1, tp}):  # at tp=1 (a one-GPU dry run) the comparison is with itself
        with LLM(str(path), device=device, tensor_parallel_size=size, max_model_len=1024, max_num_seqs=8) as llm:
            runs[size] = llm.generate(prompts, params)
            graphs = llm.engine.runner.graphs is not None
        del llm  # the closed engine's pool and graphs go before the next one sizes its own
        release()
    rows = []
    for ours, ref in zip(runs[tp], runs[1], strict=True):
        got, want = ours.outputs[0], ref.outputs[0]
        first = next((i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids, strict=True)) if a != b), None)
        gap = None
        if first is not None and want.logprobs is not None:
            top = sorted((lp.logprob for lp in want.logprobs[first].values()), reverse=True)
            gap = top[0] - top[1] if len(top) > 1 else float("inf")
        rows.append({"first_difference": first, "top2_gap": gap})
    ok = all(r["first_difference"] is None or (r["top2_gap"] is not None and r["top2_gap"] <= TIE_GAP[dtype]) for r in rows)
    return {"tp": tp, "cuda_graphs": graphs, "identical": all(r["first_difference"] is None for r in rows), "passed": ok, "prompts": rows}


def checkpoint_bytes(shape: dict[str, Any], dtype: torch.dtype, layers: int | None = None) -> tuple[int, int]:
    """(bytes of the embedding, head and norms; bytes per layer) of write_checkpoint's
    files for this shape."""
    elem = torch.empty((), dtype=dtype).element_size()
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    per_layer = (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) * elem
    return (2 * shape["vocab_size"] * h + h) * elem, per_layer


def layers_that_fit(shape: dict[str, Any], where: Path, dtype: torch.dtype) -> int:
    """How many of the shape's layers a checkpoint in `where` can hold, with 10% of the
    free space to spare (the lent 2x H200 host has 128 GB of disk and, usually, half of
    its 256 GB of memory in /dev/shm: both less than 70B's 141 GB)."""
    where.mkdir(parents=True, exist_ok=True)
    fixed, per_layer = checkpoint_bytes(shape, dtype)
    free = shutil.disk_usage(where).free * 0.9
    return max(1, min(shape["num_hidden_layers"], int((free - fixed) // per_layer)))


def load_run(path: Path, device: str, tp: int) -> dict[str, Any]:
    """Load time at TP=tp after the files were read once (warm page cache)."""
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            while chunk := fh.read(64 << 20):
                total += len(chunk)
    with LLM(str(path), device=device, tensor_parallel_size=tp, max_model_len=1024, max_num_seqs=4) as llm:
        seconds = llm.engine.load_seconds
    release()
    return {"tp": tp, "checkpoint_GB": total / 1e9, "load_s": seconds, "GBps": total / 1e9 / seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phases", nargs="+", choices=[*PHASES, "all"])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (gloo): checks the script")
    ap.add_argument("--ckpt-dir", type=Path, default=Path("/dev/shm/rtpllm-tp-bench"), help="where checkpoints are written (removed after)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    phases = PHASES if "all" in args.phases else tuple(args.phases)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and torch.cuda.device_count() < args.tp:
        raise SystemExit(f"TP={args.tp} needs {args.tp} GPUs, this host has {torch.cuda.device_count()}")
    small, big = ("tiny", "tiny") if args.smoke else ("llama8b", "llama70b")  # bench/engine.py's shapes
    dtype = torch.float32 if args.smoke else torch.bfloat16
    new_tokens = 8 if args.smoke else args.new_tokens
    root = args.ckpt_dir / f"run-{os.getpid()}"
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if device == "cuda" else "cpu (gloo)",
        "command": "python bench/tensor_parallel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tp": args.tp,
    }
    try:
        if "decode8b" in phases:
            path = model_dir(small, root)
            one = decode_run(path, device, 1, 128, new_tokens)
            many = decode_run(path, device, args.tp, 128, new_tokens)
            result["decode8b"] = {"tp1": one, f"tp{args.tp}": many, "speedup": many["tok_per_s"] / one["tok_per_s"]}
        if "allreduce" in phases:
            result["allreduce"] = allreduce_step_ms(args.tp, ModelConfig.from_dir(model_dir(small, root)), device)
        if "decode70b" in phases:
            result["decode70b"] = decode_run(model_dir(big, root), device, args.tp, 128, new_tokens)
        if "offline70b" in phases:
            n, out_len, lens = (4, 8, (10, 100)) if args.smoke else (128, 256, (100, 1024))
            result["offline70b"] = bench_throughput(model_dir(big, root), device, n, out_len, input_len=lens, tensor_parallel_size=args.tp)
        if "load70b" in phases:
            # Where the whole checkpoint does not fit, as many layers as do: the load rate
            # (GB/s) is the figure, the full model's time projected from it.
            shape = SHAPES[big][1]
            layers = layers_that_fit(shape, root, dtype)
            path = write_checkpoint(root / "70b-ckpt", {**shape, "num_hidden_layers": layers}, dtype)
            res = load_run(path, device, args.tp)
            fixed, per_layer = checkpoint_bytes(shape, dtype)
            full_gb = (fixed + shape["num_hidden_layers"] * per_layer) / 1e9
            res.update(layers_written=layers, layers=shape["num_hidden_layers"], projected_full_load_s=full_gb / res["GBps"])
            result["load70b"] = res
            shutil.rmtree(path, ignore_errors=True)
        if "check" in phases:
            path = write_checkpoint(root / "8b-ckpt", SHAPES[small][1], dtype)
            result["check"] = check_greedy(path, device, args.tp, dtype, min(new_tokens, 64))
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0 if result.get("check", {}).get("passed", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
