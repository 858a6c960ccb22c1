"""Fast checkpoint loading: file-order extents, parallel reads, overlapped host-to-device copies.

`load_checkpoint_fast` has the contract of `weights.load_checkpoint` (same targets,
same errors) and runs in three steps: parse and validate every shard header
(safetensors_header), plan extents in (file, offset) order (load_plan), then execute
them (ring_loader for CUDA destinations, direct_loader for CPU ones; destinations holds
the byte views and cast temporaries both use).

Execution, CUDA destinations ("ring" path). `num_threads` reader threads take extents in
file order and os.preadv each into a free slot of a ring of pinned host buffers. A
slot is allocated (pinned: huge pages + cudaHostRegister, see pinned.py) by the reader
that first needs one while the ring is below `ring_depth` slots, concurrently with the
other readers, so reading starts after one 16 MiB allocation, not the whole ring's;
afterwards slots are only recycled, and unregistered when the load ends. The calling thread takes each finished slot and, on a side stream, copies every
piece of it with non_blocking H2D copies: same-dtype pieces go straight into the
parameter's bytes (no GPU staging buffer, so no second device copy), cast pieces into a
temporary of the source dtype, cast into the parameter on the GPU once its last piece
has arrived. An event recorded after the extent's copies hands the slot back to the
readers when it fires, so reads of the next extents overlap the copies of the previous
ones. Reads go through the page cache by default. `direct_io=None` reads each extent
with O_DIRECT when a sampled mincore() says it is not in the page cache (no page-cache
insertion; see file_reader), but on the H100 machine's disk that was slower cold, not
faster: 11-14 s against 9.3 s buffered for 16 GB, whose kernel readahead and request
merging beat 12 concurrent 16 MiB direct reads there (docs/benchmarks.md).

Execution, CPU destinations ("direct" path). Each extent is one scatter preadv straight
into the destination tensors' memory (zero extra copies); cast tensors are read into a
temporary and cast when complete. `use_ring=True` sends CPU destinations through the
ring path instead (plain buffers, synchronous copies), which is how CPU tests exercise
the ring pipeline.

Where the time goes, Llama-3.1-8B bf16 on the H100 host (16 GB, 291 tensors, ~960
extents of 16 MiB), warm page cache, per GB: page cache -> pinned memcpy inside preadv,
12 threads at ~3.5 GB/s each (raw reads: 41 GB/s from 12 threads, 48 from 16) = ~24 ms;
pinned -> GPU DMA at ~54 GB/s = ~19 ms, overlapped with the reads but sharing host
memory bandwidth with them; Python on the calling thread ~60 extents x ~40 us (slicing,
copy_ launch, event record/query) = ~2.5 ms, while the readers sit in preadv without the
GIL; reader-side mincore samples ~5 us per extent. Per load: header parsing ~1 ms per
shard, plan building ~1 ms, the ring's 256 MiB of pinned slots, and, outside this
function, build_model's ~290 cudaMallocs. Pinning was the surprise: cudaHostAlloc runs
at ~1.6 GB/s there and serializes across threads (~0.16 s for the ring, before the
readers it delays), huge-page memory registered from the readers' threads at once at
~8 GB/s (bench/pinned_alloc.py). Cold page cache: the disk (~1.3 GB/s there, ~770 ms per
GB) is the whole cost, and memcpy, H2D and Python hide behind it. Defaults (12 readers,
16 MiB extents, 16 slots, page cache) come from the bench/load.py sweeps on that machine
(docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from rtpllm.loader.direct_loader import DirectLoader
from rtpllm.loader.file_reader import CheckpointFile
from rtpllm.loader.load_plan import DEFAULT_EXTENT_BYTES, LoadPlan, build_load_plan
from rtpllm.loader.ring_loader import RingLoader, RingTimings
from rtpllm.loader.safetensors_header import read_header
from rtpllm.loader.weights import LoadStats, safetensors_files

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def default_num_threads() -> int:
    """Reader threads: enough to saturate page-cache memcpy and an NVMe queue, bounded by cores."""
    return max(1, min(12, os.cpu_count() or 1))


def default_ring_depth(threads: int) -> int:
    """Ring slots: one per reader plus a few in flight to the GPU (a 16 MiB H2D copy takes
    ~0.3 ms against ~4 ms for its read, so slots come back quickly)."""
    return threads + 4


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
) -> LoadStats:
    """Copy every checkpoint tensor named in `targets` into its destination view, fast.

    Same semantics and errors as `weights.load_checkpoint`: destinations decide dtype
    and device; names in `optional` may be absent; `ignore` silences the warning about
    checkpoint tensors the model does not use; a missing tensor, a shape mismatch or a
    truncated/corrupt file raises CheckpointError naming the file and tensor, and all of
    these except a file shrinking mid-load are found before any data is read.

    `progress(done_bytes, total_bytes)` is called from this thread (see ProgressPrinter).
    `num_threads` readers (default: min(12, cores)); `extent_bytes` per read (a multiple
    of 4 KiB); `ring_depth` host slots (default threads + 4); `direct_io` (ring path
    only): False (default) reads through the page cache, None reads extents that are not
    in the page cache with O_DIRECT, True always; `use_ring` forces the ring path for CPU
    destinations (tests).
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
) -> RingTimings | None:
    """Read every extent of `plan` and fill its destinations (see the module docstring);
    the ring path's timings, None for the direct path."""
    threads = num_threads or default_num_threads()
    has_cuda = any(t.dest.device.type == "cuda" for t in plan.tensors)
    ring = has_cuda or bool(use_ring)
    paths = list(dict.fromkeys(e.path for e in plan.extents))
    files: dict[Path, CheckpointFile] = {}
    try:
        for path in paths:
            files[path] = CheckpointFile(path, want_direct=ring and direct_io is not False)
        if progress is not None:
            progress(0, plan.read_bytes)
        if not plan.extents:
            return None  # only empty tensors: nothing to read
        if ring:
            loader = RingLoader(
                plan, files, threads, ring_depth or default_ring_depth(threads), direct_io, progress
            )
            loader.run()
            return loader.timings
        DirectLoader(plan, files, threads, progress).run()
        return None
    finally:
        for f in files.values():
            f.close()
