"""Fast checkpoint loading: file-order extents, parallel reads, overlapped host-to-device copies.

`load_checkpoint_fast` has the contract of `weights.load_checkpoint` (same targets,
same errors) and runs in three steps: parse and validate every shard header
(safetensors_header), plan extents in (file, offset) order (load_plan), then execute
them: native_ring (the reader loop in C) for same-dtype pieces on one CUDA device,
ring_loader (the same pipeline in Python) for the rest of the CUDA work and wherever
no C compiler is found, direct_loader for CPU destinations; destinations holds the
byte views and cast temporaries the Python paths use.

Execution, CUDA destinations, C loop (default; native_ring.c). `num_threads` reader
threads claim extents in file order; each reads its extent 2 MiB at a time with pread
into one of its 4 pinned 2 MiB buffers and launches cudaMemcpyAsync of each piece part
on a stream of its own, reusing a buffer once its event fired. An extent that mincore()
says is not in the page cache gets posix_fadvise(WILLNEED) first, so the disk sees the
whole extent requested at once. No GIL, and small buffers the GPU reads while they are
still in the CPU's cache: 34-40 GB/s warm for 16 GB on the H100 machine, about the rate
at which 12-16 Python threads merely read the page cache.

Execution, CUDA destinations, Python loop ("ring"). Reader threads read whole extents
with os.preadv into pinned slots of their own (huge pages + cudaHostRegister, allocated
concurrently: pinned.py), launch each piece's copy (cudaMemcpyAsync through ctypes for
same-dtype pieces: cuda_copy) on the reader's own stream, record an event and read the
next extent into their next slot. Cast pieces go into a temporary of the source dtype
on a shared stream per device, cast into the parameter by the reader that copies the
tensor's last piece (after every piece's copy, on that stream). The calling thread only
reports progress, then waits for the streams. It runs the extents the C loop does not
take (those holding cast pieces, several devices, O_DIRECT) and everything where no C
compiler is found; warm it peaks at 24-29 GB/s, bound by a dozen threads sharing the GIL.
Reads go through the page cache by default. `direct_io=None` reads each extent with
O_DIRECT when a sampled mincore() says it is not in the page cache, but on the H100
machine's disk that was slower cold, not faster (10.5-15 s against 9.3-12 s buffered
for 16 GB): the kernel's readahead and request merging beat concurrent direct reads.

Execution, CPU destinations ("direct" path). Each extent is one scatter preadv straight
into the destination tensors' memory (zero extra copies); cast tensors are read into a
temporary and cast when complete. `use_ring=True` sends CPU destinations through the
Python ring (plain buffers, synchronous copies) and `native=True` through the C loop
(memcpy), which is how CPU tests exercise both pipelines.

Per load, besides the reads: header parsing ~1 ms per shard, plan building ~1 ms,
pinning the rings, and, outside this function, build_model's ~290 cudaMallocs (40-100
ms for 8B, now a tenth of a warm load). Pinning: cudaHostAlloc runs ~1.6 GB/s on the
H100 host and serializes across threads, so both loops pin huge-page memory with
cudaHostRegister from every reader at once (~8 GB/s, bench/pinned_alloc.py). Cold, the
disk (~1.3-1.9 GB/s there, drifting by minutes) is the whole cost. Defaults come from
the bench/load.py sweeps (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from rtpllm.loader.direct_loader import DirectLoader
from rtpllm.loader.file_reader import CheckpointFile
from rtpllm.loader.load_plan import DEFAULT_EXTENT_BYTES, LoadPlan, build_load_plan
from rtpllm.loader.native_ring import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_SLOTS,
    NativeRing,
    native_extents,
    native_library,
)
from rtpllm.loader.ring_loader import RingLoader, RingTimings
from rtpllm.loader.safetensors_header import read_header
from rtpllm.loader.shard import Target
from rtpllm.loader.weights import LoadStats, safetensors_files

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def default_num_threads() -> int:
    """Reader threads: enough to saturate page-cache memcpy and an NVMe queue, bounded by cores."""
    return max(1, min(12, os.cpu_count() or 1))


def default_ring_depth(threads: int) -> int:
    """Ring slots: two per reader, so each reads its next extent while the GPU copies
    its last one."""
    return 2 * threads


def load_checkpoint_fast(
    model_dir: str | Path,
    targets: dict[str, Target],
    *,
    optional: Iterable[str] = (),
    ignore: Callable[[str], bool] = lambda name: False,
    num_threads: int | None = None,
    progress: Progress | None = None,
    extent_bytes: int = DEFAULT_EXTENT_BYTES,
    ring_depth: int | None = None,
    direct_io: bool | None = False,
    use_ring: bool | None = None,
    native: bool | None = None,
    chunk_bytes: int | None = None,
) -> LoadStats:
    """Copy every checkpoint tensor named in `targets` into its destination view, fast.

    Same semantics and errors as `weights.load_checkpoint`: destinations decide dtype
    and device; names in `optional` may be absent; `ignore` silences the warning about
    checkpoint tensors the model does not use; a `Shard` target receives its slice (a
    tensor-parallel rank reads only its own bytes); a missing tensor, a shape mismatch or a
    truncated/corrupt file raises CheckpointError naming the file and tensor, and all of
    these except a file shrinking mid-load are found before any data is read.

    `progress(done_bytes, total_bytes)` is called from this thread (see ProgressPrinter).
    `num_threads` readers (default: min(12, cores)); `extent_bytes` per read (a multiple
    of 4 KiB); `ring_depth` host slots (default 2 x threads); `direct_io` (ring path
    only): False (default) reads through the page cache, None reads extents that are not
    in the page cache with O_DIRECT, True always; `use_ring` forces the ring path for CPU
    destinations (tests). `native`: None (default) runs the C reader loop where it can
    (page-cache reads, one CUDA device, a C compiler; see native_ring), True requires it
    (and runs it for CPU destinations too: tests), False never; `chunk_bytes` is its read
    and copy size (default 2 MiB).
    Returns when every destination holds its data (CUDA copies are synchronized).
    """
    start = time.perf_counter()
    headers = [read_header(path) for path in safetensors_files(model_dir)]
    plan = build_load_plan(
        headers, targets, optional=optional, ignore=ignore, extent_bytes=extent_bytes, source=model_dir
    )
    detail = execute_plan(
        plan,
        num_threads=num_threads,
        progress=progress,
        ring_depth=ring_depth,
        direct_io=direct_io,
        use_ring=use_ring,
        native=native,
        chunk_bytes=chunk_bytes,
    )
    stats = LoadStats(
        bytes_read=plan.tensor_bytes,
        seconds=time.perf_counter() - start,
        num_tensors=len(plan.tensors),
        detail=detail.as_dict() if detail is not None else {},
    )
    log.info(
        "loaded %d tensors (%.2f GB) from %s in %.2f s (%.2f GB/s)%s",
        stats.num_tensors,
        stats.bytes_read / 1e9,
        model_dir,
        stats.seconds,
        stats.gb_per_s,
        _describe(detail),
    )
    return stats


def _describe(t: RingTimings | None) -> str:
    """Where a ring load's time went, for the log line (empty for the CPU direct path)."""
    if t is None or not t.readers or t.wall_s <= 0:
        return ""
    busy = t.readers * t.wall_s
    uncached = f", {t.hinted} of {t.extents} extents not in the page cache" if t.native else ""
    return (
        f"; {'C' if t.native else 'Python'} loop, {t.readers} readers: reading {t.read_s / busy:.0%}, "
        f"waiting for buffers {t.slot_wait_s / busy:.0%}, launching copies {t.issue_s / busy:.0%}"
        f"{uncached}; pinning {t.alloc_s / t.readers:.3f} s per reader"
    )


def execute_plan(
    plan: LoadPlan,
    *,
    num_threads: int | None = None,
    progress: Progress | None = None,
    ring_depth: int | None = None,
    direct_io: bool | None = False,
    use_ring: bool | None = None,
    native: bool | None = None,
    chunk_bytes: int | None = None,
) -> RingTimings | None:
    """Read every extent of `plan` and fill its destinations (see the module docstring);
    the ring path's timings, None for the direct path."""
    threads = num_threads or default_num_threads()
    cuda_devices = {t.dest.device for t in plan.tensors if t.dest.device.type == "cuda"}
    ring = bool(cuda_devices) or bool(use_ring) or bool(native)
    native_device = _native_device(cuda_devices, native, direct_io)
    paths = list(dict.fromkeys(e.path for e in plan.extents))
    files: dict[Path, CheckpointFile] = {}
    try:
        for path in paths:
            files[path] = CheckpointFile(path, want_direct=ring and direct_io is not False)
        if progress is not None:
            progress(0, plan.read_bytes)
        if not plan.extents:
            return None  # only empty tensors: nothing to read
        if not ring:
            DirectLoader(plan, files, threads, progress).run()
            return None
        timings = None
        rest = list(plan.extents)
        if native_device is not None:
            mine, rest = native_extents(plan.extents, native_device)
            native_bytes = sum(e.nbytes for e in mine)
            timings = NativeRing(
                mine,
                files,
                device=native_device if native_device.type == "cuda" else None,
                threads=threads,
                chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES,
                slots=max(1, ring_depth // threads) if ring_depth else DEFAULT_SLOTS,
                progress=None if progress is None else lambda done: progress(done, plan.read_bytes),
            ).run()
            if progress is not None and rest:
                progress = _offset_progress(progress, native_bytes, plan.read_bytes)
        if rest:
            sub = plan if len(rest) == len(plan.extents) else dataclasses.replace(plan, extents=tuple(rest))
            loader = RingLoader(
                sub, files, threads, ring_depth or default_ring_depth(threads), direct_io, progress
            )
            loader.run()
            timings = loader.timings if timings is None else _merged(timings, loader.timings)
        return timings
    finally:
        for f in files.values():
            f.close()


def _native_device(
    cuda_devices: set[torch.device], native: bool | None, direct_io: bool | None
) -> torch.device | None:
    """The device the C reader loop serves in this load (cpu: host destinations), or None."""
    if native is False or (native is None and not cuda_devices):
        return None  # CPU loads use the direct path unless asked: no need to build the library
    why_not = None
    if direct_io is not False:
        why_not = "it reads through the page cache (direct_io=False)"
    elif len(cuda_devices) > 1:
        why_not = "it serves one CUDA device"
    elif native_library() is None:
        why_not = "it is not available here (no C compiler, or RTPLLM_NATIVE_LOADER=0)"
    if why_not is not None:
        if native:
            raise ValueError(f"native=True, but the native loader cannot run this load: {why_not}")
        return None
    return next(iter(cuda_devices)) if cuda_devices else torch.device("cpu")


def _offset_progress(progress: Progress, before: int, total: int) -> Progress:
    """Progress of a load's second part, reported as the whole load's."""
    return lambda done, _: progress(before + done, total)


def _merged(a: RingTimings, b: RingTimings) -> RingTimings:
    """One load's timings from its native and Python parts (sums; wall times add: they ran in turn)."""
    merged = RingTimings()
    for name, value in a.__dict__.items():
        other = getattr(b, name)
        setattr(
            merged, name, max(value, other) if name in ("readers", "native", "slot_mib") else value + other
        )
    return merged
