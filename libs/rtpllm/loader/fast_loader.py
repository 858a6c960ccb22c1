"""Fast checkpoint loading: file-order extents, parallel reads, overlapped host-to-device copies.

`load_checkpoint_fast` has the contract of `weights.load_checkpoint` (same targets,
same errors) and runs in three steps: parse and validate every shard header
(safetensors_header), plan extents in (file, offset) order (load_plan), then execute
them (ring_loader for CUDA destinations, direct_loader for CPU ones; destinations holds
the byte views and cast temporaries both use).

Execution, CUDA destinations ("ring" path). `num_threads` reader threads take extents in
file order; each reads an extent with os.preadv into one of its own pinned host slots
(`ring_depth` / threads of them, allocated on first use, concurrently in every reader:
huge pages + cudaHostRegister, see pinned.py), launches the extent's non_blocking H2D
copies on the side stream of the destination's device, records an event and reads the
next extent into its next slot; a slot is read into again once its event fired, so
reads overlap copies. Same-dtype pieces go straight into the parameter's bytes (no GPU
staging buffer, no second device copy); cast pieces go into a temporary of the source
dtype, cast into the parameter on the GPU by the reader that copies its last piece (on
the same stream as every piece's copy, so after them). The calling thread only counts
finished extents for the progress bar, then waits for the streams. Readers launching
their own copies replaced a single copying thread that every extent went through. Reads
go through the page cache by default. `direct_io=None` reads each extent with O_DIRECT
when a sampled mincore() says it is not in the page cache (no page-cache insertion; see
file_reader), but on the H100 machine's disk that was slower cold, not faster: 10.5-15 s
against 9.3-12 s buffered for 16 GB, whose kernel readahead and request merging beat 12
concurrent direct reads there (docs/benchmarks.md).

Execution, CPU destinations ("direct" path). Each extent is one scatter preadv straight
into the destination tensors' memory (zero extra copies); cast tensors are read into a
temporary and cast when complete. `use_ring=True` sends CPU destinations through the
ring path instead (plain buffers, synchronous copies), which is how CPU tests exercise
the ring pipeline.

Where the time goes, Llama-3.1-8B bf16 on the H100 host (16 GB, 291 tensors, ~1900
extents of 8 MiB), warm page cache. Each byte crosses host memory three times: read from
the page cache and written to a pinned slot (the memcpy inside preadv), then read by the
GPU's DMA (54 GB/s alone). Raw parallel reads, which do only the first two, reach 36-52
GB/s from 16 threads depending on the machine instance, so host memory bandwidth, not
the disk cache, the PCIe link or Python, bounds a bounce-buffer loader at roughly 2/3 of
that; ours runs at 55-60% of it (21-29 GB/s across instances; readers in preadv ~75% of
the time, launching copies ~10%). Per load: header parsing ~1 ms per shard, plan
building ~1 ms, pinning the 192 MiB ring, and, outside this function, build_model's ~290
cudaMallocs. Pinning was a surprise: cudaHostAlloc runs at ~1.6 GB/s there and
serializes across threads (~0.16 s for a 256 MiB ring, delaying the readers), while
huge-page memory registered from several threads at once pins ~8 GB/s
(bench/pinned_alloc.py). Cold page cache: the disk (~1.3-1.8 GB/s there) is the whole
cost, and memcpy, H2D and Python hide behind it. Defaults (12 readers, 8 MiB extents, 2
slots each, page cache) come from the bench/load.py sweeps on that machine
(docs/benchmarks.md). Copies of same-dtype pieces on one device are launched with
cudaMemcpyAsync through ctypes (cuda_copy), ~6% of a reader's time at 8 MiB. Going past
the bounce-buffer bound needs the GPU to read the page cache itself (GPUDirect Storage,
or registering the page-cache pages), or slots small enough to stay in the CPU cache
while the GPU reads them; 2 and 4 MiB extents were slower, the readers spending 22-40%
of their time in the copy launches themselves.
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
    targets: dict[str, torch.Tensor],
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
    checkpoint tensors the model does not use; a missing tensor, a shape mismatch or a
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
        "loaded %d tensors (%.2f GB) from %s in %.2f s (%.2f GB/s)",
        stats.num_tensors,
        stats.bytes_read / 1e9,
        model_dir,
        stats.seconds,
        stats.gb_per_s,
    )
    return stats


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
    if native is False:
        return None
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
    if cuda_devices:
        return next(iter(cuda_devices))
    return torch.device("cpu") if native else None


def _offset_progress(progress: Progress, before: int, total: int) -> Progress:
    """Progress of a load's second part, reported as the whole load's."""
    return lambda done, _: progress(before + done, total)


def _merged(a: RingTimings, b: RingTimings) -> RingTimings:
    """One load's timings from its native and Python parts (sums; wall times add: they ran in turn)."""
    merged = RingTimings()
    for name, value in a.__dict__.items():
        other = getattr(b, name)
        setattr(merged, name, max(value, other) if name in ("readers", "native", "slot_mib") else value + other)
    return merged
