"""Checkpoint load time-to-device: raw read limit vs safetensors vs transformers vs ours.

    python bench/load.py --dir /data/llama8b-rand --out load.json            # GPU: 16 GB, ~4 min
    python bench/load.py --dir /tmp/small --out load.json --device cpu --size small   # CPU smoke

Writes a random bf16 Llama-3.1-8B-shape checkpoint (4 shards + index, like the real one;
kept and reused when it is already there), then measures in one run, each cold (page
cache dropped: os.sync() + /proc/sys/vm/drop_caches as root, else per-file
posix_fadvise(DONTNEED), which also works unprivileged) and warm (files in the page
cache):

- raw: the files read by N threads with 16 MiB preads, page cache and O_DIRECT -- the
  disk limit a loader can reach (plus, warm, the page-cache -> host limit);
- safetensors `load_file(device=...)` shard by shard;
- transformers `AutoModelForCausalLM.from_pretrained(dtype=bfloat16, device_map=...)`;
- ours: `build_model` + `load_checkpoint_fast` with its defaults (page cache), and with
  `direct_io=None` (O_DIRECT for extents not in the page cache);
- a warm sweep of ours over reader threads, extent size and ring depth (--sweep), with
  where the time went (reading, waiting for ring slots, pinning them, copying).

Every time includes getting the data onto the device, synchronized. The table comes
last; --out gets the JSON (date, machine, command, every number).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import mmap
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import rtpllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))

from rtpllm.attention import get_backend
from rtpllm.loader.fast_loader import default_num_threads, load_checkpoint_fast
from rtpllm.loader.file_reader import CheckpointFile, resident_pages
from rtpllm.loader.load_plan import DEFAULT_EXTENT_BYTES
from rtpllm.loader.progress import ProgressPrinter
from rtpllm.loader.random_checkpoint import LLAMA_3_1_8B_SHAPE, make_config
from rtpllm.loader.weights import safetensors_files
from rtpllm.models import DecoderLM, ModelConfig, build_model

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B.
    "8b": {
        k: LLAMA_3_1_8B_SHAPE[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
    },
    # ~0.35 GB: big enough for many extents, small enough for a CPU smoke run.
    "small": {
        "hidden_size": 1024,
        "intermediate_size": 3584,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}
NUM_SHARDS = 4
CHUNK = 16 << 20
MAX_POSITION = 4096  # rotary table size for build_model; irrelevant to loading
OURS = "ours (default: page cache)"
RAW = "raw read (page cache)"


# -- checkpoint -------------------------------------------------------------------------


def tensor_shapes(shape: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes in the order HF writes them."""
    h, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def ensure_checkpoint(root: Path, size: str, gen_device: str) -> list[Path]:
    """Write the checkpoint unless `root` already holds this one (manifest + file sizes)."""
    from safetensors.torch import save_file

    shape = SHAPES[size]
    manifest_path = root / "bench_manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        sizes = manifest.get("files", {})
        if manifest.get("shape") == shape and all(
            (root / f).is_file() and (root / f).stat().st_size == n for f, n in sizes.items()
        ):
            print(f"reusing checkpoint in {root}", file=sys.stderr)
            return [root / f for f in sizes]
    shapes = tensor_shapes(shape)
    total = sum(2 * _numel(s) for _, s in shapes)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < total * 1.1:
        raise SystemExit(f"{root}: {free / 1e9:.1f} GB free, the checkpoint needs {total / 1e9:.1f} GB")
    shards = split_shards(shapes)
    gen = torch.Generator(device=gen_device).manual_seed(0)
    weight_map: dict[str, str] = {}
    t0 = time.perf_counter()
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            name: (torch.randn(s, generator=gen, device=gen_device, dtype=torch.bfloat16) * 0.02).cpu()
            for name, s in shard
        }
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
        print(f"wrote {fname} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    # The real Llama-3.1-8B config (llama3 rope scaling etc.), with this run's shape.
    config = {**make_config("llama", **LLAMA_3_1_8B_SHAPE), **shape, "torch_dtype": "bfloat16"}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    files = sorted(set(weight_map.values()))
    sizes = {f: (root / f).stat().st_size for f in files}
    manifest_path.write_text(json.dumps({"shape": shape, "files": sizes}, indent=2))
    return [root / f for f in files]


def split_shards(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy shards in file order, sized so there are NUM_SHARDS, the last one small (as HF's)."""
    budget = sum(2 * _numel(s) for _, s in shapes) / (NUM_SHARDS - 0.75)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, s in shapes:
        if used + 2 * _numel(s) > budget and shards[-1]:
            shards.append([])
            used = 0
        shards[-1].append((name, s))
        used += 2 * _numel(s)
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- page cache -------------------------------------------------------------------------


def drop_page_cache(files: list[Path], mode: str) -> tuple[str, float]:
    """Evict the files from the page cache; returns (how, share of their pages still cached)."""
    os.sync()
    how = "drop_caches"
    try:
        if mode != "auto":
            raise PermissionError("per-file eviction requested")
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        # Unprivileged fallback: clean pages of a file we can open are dropped on request.
        how = "fadvise"
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return how, cached_share(files)


def cached_share(files: list[Path]) -> float:
    cached = total = 0
    for path in files:
        f = CheckpointFile(path, want_direct=False)
        try:
            pages = resident_pages(f)
            if pages is None:
                return float("nan")
            cached += int(pages.sum())
            total += len(pages)
        finally:
            f.close()
    return cached / max(total, 1)


# -- methods ----------------------------------------------------------------------------


def raw_read(files: list[Path], threads: int, direct: bool) -> float:
    """Seconds for `threads` threads to read every byte with CHUNK-sized preads (no device copy)."""
    jobs = [(p, off) for p in files for off in range(0, p.stat().st_size, CHUNK)]
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = {p: os.open(p, flags) for p in files}
    lock = threading.Lock()
    it = iter(jobs)
    errors: list[BaseException] = []

    def worker() -> None:
        buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
        view = memoryview(buf)
        try:
            while True:
                with lock:
                    job = next(it, None)
                if job is None:
                    return
                path, off = job
                got = 0
                while got < CHUNK:
                    n = os.preadv(fds[path], [view[got:]], off + got)
                    if n <= 0 or (direct and n % 4096):
                        break  # end of file
                    got += n
        except BaseException as exc:
            errors.append(exc)
        finally:
            view.release()
            buf.close()

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    if errors:
        raise errors[0]
    return seconds


def run_safetensors(root: Path, device: str) -> float:
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    tensors = [load_file(str(p), device=device) for p in safetensors_files(root)]
    sync(device)
    seconds = time.perf_counter() - t0
    del tensors
    return seconds


def run_transformers(root: Path, device: str) -> tuple[float, str]:
    from transformers import AutoModelForCausalLM

    note = ""
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.bfloat16, device_map=device)
    except (ImportError, ValueError) as exc:  # device_map needs `accelerate` on some versions
        note = f"device_map failed ({str(exc)[:80]}); loaded on CPU then .to({device})"
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.bfloat16).to(device)
    sync(device)
    seconds = time.perf_counter() - t0
    del model
    return seconds, note


def run_ours(
    root: Path,
    device: str,
    args: argparse.Namespace,
    direct_io: bool | None,
    threads: int,
    extent_mib: int,
    ring_depth: int | None = None,
    chunk_kib: int | None = None,
    native: bool | None = None,
) -> tuple[float, float, DecoderLM, dict[str, Any]]:
    """(total seconds, of which build_model, model, the loader's timing detail):
    allocation + load, synchronized."""
    config = ModelConfig.from_dir(root)
    backend = get_backend("torch", device)
    progress = ProgressPrinter("ours") if args.progress else None
    t0 = time.perf_counter()
    model = build_model(config, backend, MAX_POSITION, torch.bfloat16, device)
    sync(device)
    t1 = time.perf_counter()
    stats = load_checkpoint_fast(
        root,
        model.checkpoint_targets(),
        optional=model.optional_checkpoint_names(),
        ignore=lambda name: name.endswith(DecoderLM.IGNORED_SUFFIXES),
        num_threads=threads,
        extent_bytes=extent_mib << 20,
        ring_depth=ring_depth,
        direct_io=direct_io,
        progress=progress,
        chunk_bytes=chunk_kib << 10 if chunk_kib else None,
        native=native,
    )
    sync(device)
    return time.perf_counter() - t0, t1 - t0, model, stats.detail


def spot_check(model: DecoderLM, root: Path) -> None:
    """A few tensors of the loaded model against safetensors, bit for bit (catches a broken load)."""
    from safetensors import safe_open

    targets = model.checkpoint_targets()
    names = [
        "model.norm.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ]
    for path in safetensors_files(root):
        with safe_open(str(path), framework="pt") as f:
            for name in set(names) & set(f.keys()):
                if not torch.equal(
                    f.get_tensor(name).view(torch.int16), targets[name].cpu().view(torch.int16)
                ):
                    raise SystemExit(f"BROKEN LOAD: {name} differs from the checkpoint")


def h2d_bandwidth(device: str) -> float | None:
    """Pinned host -> device GB/s for 1 GiB copies: the ceiling of any warm load."""
    if device != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    sync(device)
    return 3 * (1 << 30) / (time.perf_counter() - t0) / 1e9


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    """Free device memory and the pinned-host cache so each run pays its own allocations."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        empty_host = getattr(torch.accelerator, "empty_host_cache", None) or getattr(
            torch._C, "_host_emptyCache", None
        )
        if empty_host is not None:
            empty_host()


# -- driver -----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="checkpoint directory (written if absent)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results path")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--size", default="8b", choices=sorted(SHAPES))
    ap.add_argument(
        "--threads", type=int, default=default_num_threads(), help="reader threads (raw and ours)"
    )
    ap.add_argument(
        "--extent-mib", type=int, default=DEFAULT_EXTENT_BYTES >> 20, help="our extent size in MiB"
    )
    ap.add_argument("--warm-repeats", type=int, default=3, help="warm runs per method (the median counts)")
    ap.add_argument(
        "--methods",
        default="raw,safetensors,transformers,ours,ours-python,ours-odirect",
        help="comma-separated subset of raw,safetensors,transformers,ours,ours-python,ours-odirect",
    )
    ap.add_argument("--no-cold", action="store_true", help="warm runs only")
    ap.add_argument(
        "--cold-rounds", type=int, default=2, help="cold runs of raw (page cache) and ours, alternating"
    )
    ap.add_argument("--progress", action="store_true", help="progress bar on stderr for our loads")
    ap.add_argument("--no-sweep", action="store_true", help="skip the warm threads/extent-size sweep of ours")
    ap.add_argument(
        "--sweep",
        default="8:8,12:8,16:8,12:8:24:4096,16:8:32:4096,12:16,p12:8,p16:8",
        help="warm sweep configs THREADS:EXTENT_MIB[:RING_DEPTH[:CHUNK_KIB]] (0 = default), comma-separated (entries above the core count are skipped)",
    )
    ap.add_argument("--sweep-repeats", type=int, default=2, help="runs per sweep config (the fastest counts)")
    ap.add_argument(
        "--cold-sweep",
        default="",
        help="cold runs of ours at THREADS:EXTENT_MIB[:RING_DEPTH[:CHUNK_KIB]] configs, comma-separated (one run each)",
    )
    ap.add_argument(
        "--cache-drop",
        default="auto",
        choices=["auto", "fadvise"],
        help="auto: /proc/sys/vm/drop_caches (root), else per-file fadvise; fadvise: only this checkpoint's pages",
    )
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu")
    methods = args.methods.split(",")
    files = ensure_checkpoint(args.dir, args.size, "cuda" if args.device == "cuda" else "cpu")
    tensor_bytes = sum(2 * _numel(s) for _, s in tensor_shapes(SHAPES[args.size]))
    file_bytes = sum(p.stat().st_size for p in files)
    if args.device == "cuda":  # context creation is nobody's load time
        torch.zeros(1, device="cuda")
        sync(args.device)
    if any(m.startswith("ours") for m in methods):
        # Nor is the first build_model's one-time setup (~3.7 s on the GPU machine: lazy
        # CUDA/library initialization), which would otherwise land on whichever of our
        # runs comes first.
        build_model(
            ModelConfig.from_dir(args.dir),
            get_backend("torch", args.device),
            MAX_POSITION,
            torch.bfloat16,
            args.device,
        )
        release(args.device)

    cold_ok = not args.no_cold
    drops: list[dict[str, Any]] = []

    def cold() -> None:
        how, share = drop_page_cache(files, args.cache_drop)
        drops.append({"how": how, "still_cached": share})
        print(f"  page cache dropped ({how}); {share:.1%} of the checkpoint still cached", file=sys.stderr)

    def warm() -> None:
        raw_read(files, args.threads, direct=False)

    # (label, run, bytes it moves, runs warm too)
    Method = tuple[str, Callable[[], float | tuple[float, str]], int, bool]
    planned: list[Method] = []
    if "raw" in methods:
        planned.append((RAW, lambda: raw_read(files, args.threads, direct=False), file_bytes, True))
        planned.append(
            ("raw read (O_DIRECT)", lambda: raw_read(files, args.threads, direct=True), file_bytes, False)
        )
    if "safetensors" in methods:
        planned.append(
            ("safetensors load_file", lambda: run_safetensors(args.dir, args.device), tensor_bytes, True)
        )
    if "transformers" in methods:
        planned.append(
            (
                "transformers from_pretrained",
                lambda: run_transformers(args.dir, args.device),
                tensor_bytes,
                True,
            )
        )
    for name, direct_io, native, label in (
        ("ours", False, None, OURS),
        ("ours-python", False, False, "ours (Python reader loop)"),
        ("ours-odirect", None, False, "ours (O_DIRECT if uncached)"),
    ):
        if name in methods:

            def ours(direct_io: bool | None = direct_io, native: bool | None = native) -> tuple[float, str]:
                seconds, build_s, model, detail = run_ours(
                    args.dir, args.device, args, direct_io, args.threads, args.extent_mib, native=native
                )
                spot_check(model, args.dir)
                return seconds, f"build_model {build_s:.3f} s of it; {brief(detail)}"

            planned.append((label, ours, tensor_bytes, True))

    runs: dict[str, dict[str, list[tuple[float, str]]]] = {m[0]: {"cold": [], "warm": []} for m in planned}
    errors: dict[str, str] = {}

    def run_once(method: Method, phase: str) -> None:
        name, fn, nbytes, _ = method
        if name in errors:
            return
        (cold if phase == "cold" else warm)()
        print(f"{name} ({phase}) ...", file=sys.stderr)
        try:
            out = fn()
        except Exception as exc:  # a failing baseline must not cost the other numbers
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  failed: {errors[name]}", file=sys.stderr)
            return
        finally:
            release(args.device)
        seconds, note = out if isinstance(out, tuple) else (out, "")
        runs[name][phase].append((seconds, note))
        print(f"  {seconds:.2f} s, {nbytes / seconds / 1e9:.2f} GB/s", file=sys.stderr)

    # The disk's rate drifts by 10-30% over minutes, so the cold limit (raw, page cache)
    # and our cold load run back to back, alternating, --cold-rounds times.
    paired = [m for m in planned if m[0] in (RAW, OURS)] if cold_ok else []
    for _ in range(args.cold_rounds if len(paired) == 2 else 0):
        for method in paired:
            run_once(method, "cold")
    for method in planned:
        if cold_ok and (method not in paired or len(paired) < 2):
            run_once(method, "cold")
        for _ in range(args.warm_repeats if method[3] else 0):
            run_once(method, "warm")

    results: dict[str, dict[str, Any]] = {}
    for name, _, nbytes, _ in planned:
        row: dict[str, Any] = {}
        for phase, done in runs[name].items():
            if not done:
                continue
            # The median run (warm runs repeat: one load is ~0.5 s and varies by ~15%;
            # of an even count, the slower middle one).
            seconds, note = sorted(done)[len(done) // 2]
            row[f"{phase}_s"] = seconds
            row[f"{phase}_gbps"] = nbytes / seconds / 1e9
            row[f"{phase}_runs_s"] = [t for t, _ in done]
            if note:
                row[f"{phase}_note"] = note
        if name in errors:
            row["error"] = errors[name]
        results[name] = row

    def run_config(
        threads: int, extent: int, depth: int | None, chunk: int | None, native: bool | None
    ) -> tuple[float, float, dict[str, Any]]:
        """One load of ours in a sweep's config: (seconds, of which build_model, timings)."""
        try:
            seconds, build_s, model, detail = run_ours(
                args.dir, args.device, args, False, threads, extent, depth, chunk, native
            )
            del model
        finally:
            release(args.device)
        return seconds, build_s, detail

    sweep: list[dict[str, Any]] = []
    if "ours" in methods and not args.no_sweep:
        # Warm only: which reader count, extent size and ring depth feed the copy engine
        # best, and where the time goes (reads vs waiting for slots vs copies).
        warm()
        for threads, extent, depth, chunk, native in parse_sweep(args.sweep, os.cpu_count() or 1):
            best: dict[str, Any] | None = None
            for _ in range(args.sweep_repeats):
                seconds, build_s, detail = run_config(threads, extent, depth, chunk, native)
                if best is None or seconds < best["warm_s"]:
                    best = {"warm_s": seconds, "build_s": build_s, "detail": detail}
            assert best is not None
            sweep.append(
                {
                    "threads": threads,
                    "extent_mib": extent,
                    "depth": depth,
                    "chunk_kib": chunk,
                    "native": native,
                    **best,
                }
            )
            print(
                f"  sweep {'python ' if native is False else ''}{threads}x{extent}x{depth}x{chunk}: {best['warm_s']:.3f} s; {brief(best['detail'])}",
                file=sys.stderr,
            )
        for threads in sorted({c[0] for c in parse_sweep(args.sweep, os.cpu_count() or 1)}):
            if threads != args.threads and threads <= (os.cpu_count() or 1):
                seconds = min(raw_read(files, threads, direct=False) for _ in range(2))
                sweep.append({"raw_threads": threads, "warm_s": seconds})
                print(
                    f"  sweep raw read, {threads} threads: {file_bytes / seconds / 1e9:.1f} GB/s",
                    file=sys.stderr,
                )

    cold_sweep: list[dict[str, Any]] = []
    if "ours" in methods and args.cold_sweep and cold_ok:
        # Cold only: which extent size and reader count keep the disk busiest.
        for threads, extent, depth, chunk, native in parse_sweep(args.cold_sweep, os.cpu_count() or 1):
            cold()
            seconds, build_s, detail = run_config(threads, extent, depth, chunk, native)
            cold_sweep.append(
                {
                    "threads": threads,
                    "extent_mib": extent,
                    "depth": depth,
                    "chunk_kib": chunk,
                    "native": native,
                    "cold_s": seconds,
                    "cold_gbps": tensor_bytes / seconds / 1e9,
                    "build_s": build_s,
                    "detail": detail,
                }
            )
            print(
                f"  cold sweep {threads}x{extent}x{depth}: {seconds:.3f} s; {brief(detail)}", file=sys.stderr
            )
        # The disk's rate drifts over minutes: the raw limit again, after the sweep.
        cold()
        seconds = raw_read(files, args.threads, direct=False)
        cold_sweep.append(
            {"raw_threads": args.threads, "cold_s": seconds, "cold_gbps": file_bytes / seconds / 1e9}
        )

    h2d = h2d_bandwidth(args.device)
    report = summarize(results, h2d, cold_ok and all(d["still_cached"] < 0.05 for d in drops))
    payload = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "host": platform.node(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "checkpoint": {
            "dir": str(args.dir),
            "size": args.size,
            "files": len(files),
            "file_bytes": file_bytes,
        },
        "tensor_bytes": tensor_bytes,
        "threads": args.threads,
        "extent_mib": args.extent_mib,
        "cache_drops": drops,
        "h2d_pinned_gbps": h2d,
        "results": results,
        "warm_sweep": [{**r, "warm_gbps": tensor_bytes / r["warm_s"] / 1e9} for r in sweep],
        "cold_sweep": cold_sweep,
        "summary": report,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(payload, indent=2))
    print_table(results, report, h2d, drops)
    if args.device == "cpu":
        print(
            "note (CPU): load_file returns tensors backed by its mmap and ours writes into freshly "
            "allocated model memory (first-touch page faults count), and all 'ours' rows run the same "
            "CPU path (O_DIRECT is for CUDA destinations): only the GPU numbers mean anything"
        )
    for r in payload["warm_sweep"]:
        if "raw_threads" in r:
            print(
                f"  raw read warm, {r['raw_threads']:>2} threads: {r['warm_s']:.3f} s  {file_bytes / r['warm_s'] / 1e9:.2f} GB/s"
            )
            continue
        print(
            f"  ours{' (Python loop)' if r.get('native') is False else ''} warm, {r['threads']:>2} threads, {r['extent_mib']:>2} MiB extents, depth {r['depth'] or 'default'}, chunk {r.get('chunk_kib') or '-'} KiB: "
            f"{r['warm_s']:.3f} s  {r['warm_gbps']:.2f} GB/s  (build_model {r['build_s']:.3f} s; {brief(r['detail'])})"
        )
    for r in cold_sweep:
        if "raw_threads" in r:
            print(
                f"  raw read cold again, {r['raw_threads']:>2} threads: {r['cold_s']:.3f} s  {r['cold_gbps']:.2f} GB/s"
            )
            continue
        print(
            f"  ours{' (Python loop)' if r.get('native') is False else ''} cold, {r['threads']:>2} threads, {r['extent_mib']:>2} MiB extents, depth {r['depth'] or 'default'}, chunk {r.get('chunk_kib') or '-'} KiB: "
            f"{r['cold_s']:.3f} s  {r['cold_gbps']:.2f} GB/s  ({brief(r['detail'])})"
        )


def parse_sweep(spec: str, ncpu: int) -> list[tuple[int, int, int | None, int | None, bool | None]]:
    """'[p]THREADS:EXTENT_MIB[:DEPTH[:CHUNK_KIB]],...' -> (threads, extent MiB, depth, chunk
    KiB, native) configs: depth or chunk 0 or absent = the loader's default; a leading 'p'
    runs the Python reader loop (native=False), else the loader's default (C where it can)."""
    configs: list[tuple[int, int, int | None, int | None, bool | None]] = []
    for item in filter(None, spec.split(",")):
        python = item.startswith("p")
        parts = [int(x) for x in item.removeprefix("p").split(":")]
        if len(parts) not in (2, 3, 4) or min(parts[:2]) <= 0 or min(parts) < 0:
            raise SystemExit(f"--sweep: bad entry {item!r}; want [p]THREADS:EXTENT_MIB[:DEPTH[:CHUNK_KIB]]")
        depth, chunk = (parts[2:] + [0, 0])[:2]
        if parts[0] <= ncpu:
            configs.append((parts[0], parts[1], depth or None, chunk or None, False if python else None))
    return configs


def brief(detail: dict[str, Any]) -> str:
    """The ring loader's timings in one line: per-reader busy shares and the waits."""
    if not detail:
        return "no timings"
    wall, readers = detail["wall_s"] or 1e-9, detail["readers"] or 1
    loop = f"C loop, {detail.get('hinted', 0)} extents hinted" if detail.get("native") else "Python loop"
    return (
        f"{loop}; ring {detail['slots']}x{detail['slot_mib']:g} MiB; readers reading {detail['read_s'] / readers / wall:.0%}, "
        f"waiting for slots {detail['slot_wait_s'] / readers / wall:.0%}, allocating {detail['alloc_s']:.3f} s; "
        f"launching copies {detail['issue_s'] / readers / wall:.0%}; O_DIRECT {detail['direct_reads']}/{detail['extents']}"
    )


def summarize(results: dict[str, dict[str, Any]], h2d: float | None, cold_valid: bool) -> dict[str, Any]:
    raw_cold = [r.get("cold_gbps", 0.0) for k, r in results.items() if k.startswith("raw")]
    ours = results.get(OURS, {})
    st = results.get("safetensors load_file", {})
    out: dict[str, Any] = {"cold_valid": cold_valid}
    if raw_cold and max(raw_cold) and "cold_gbps" in ours:
        out["cold_limit_gbps"] = max(raw_cold)
        out["ours_cold_vs_limit"] = ours["cold_gbps"] / max(raw_cold)
    if "warm_gbps" in ours and "warm_gbps" in st:
        out["ours_warm_vs_safetensors"] = ours["warm_gbps"] / st["warm_gbps"]
    if "warm_gbps" in ours:
        out["ours_warm_gbps"] = ours["warm_gbps"]
    return out


def print_table(
    results: dict[str, dict[str, Any]], report: dict[str, Any], h2d: float | None, drops: list[dict[str, Any]]
) -> None:
    cold_label = "cold" if report["cold_valid"] else "cold?"

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    print()
    print(f"{'method':<30} {cold_label + ' s':>8} {cold_label + ' GB/s':>10} {'warm s':>8} {'warm GB/s':>10}")
    for name, row in results.items():
        line = (
            f"{name:<30} {cell(row, 'cold_s', '8.2f')} {cell(row, 'cold_gbps', '10.2f')} "
            f"{cell(row, 'warm_s', '8.2f')} {cell(row, 'warm_gbps', '10.2f')}"
        )
        print(line + (f"   ERROR {row['error'][:60]}" if "error" in row else ""))
    for name, row in results.items():
        notes = {k.removesuffix("_note"): v for k, v in row.items() if k.endswith("_note")}
        if len(set(notes.values())) == 1:
            print(f"  {name}: {next(iter(notes.values()))}")
        elif notes:
            print(f"  {name}: {'; '.join(f'{k}: {v}' for k, v in notes.items())}")
    if drops:
        how = ", ".join(sorted({d["how"] for d in drops}))
        worst = max(d["still_cached"] for d in drops)
        print(f"cold = page cache dropped via {how}; at most {worst:.1%} of the files stayed cached")
        if not report["cold_valid"]:
            print("WARNING: the cache could not be dropped fully: cold numbers are not cold (warm-only run)")
    else:
        print("cold runs skipped: warm-only results")
    if h2d is not None:
        print(f"pinned host->device copy: {h2d:.1f} GB/s")
    if "ours_cold_vs_limit" in report:
        print(
            f"ours cold = {report['ours_cold_vs_limit']:.0%} of the raw read limit "
            f"({report['cold_limit_gbps']:.2f} GB/s); target >= 90%"
        )
    if "ours_warm_vs_safetensors" in report:
        print(
            f"ours warm = {report['ours_warm_gbps']:.1f} GB/s, {report['ours_warm_vs_safetensors']:.1f}x "
            "safetensors; targets >= 25 GB/s on the H100 host and >= 4x"
        )


if __name__ == "__main__":
    main()
