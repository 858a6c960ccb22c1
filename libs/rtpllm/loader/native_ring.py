"""The ring loader's reader loop in C (native_ring.c), built with the system C compiler.

Why C: the Python ring (ring_loader.py) ran at 55-65% of the host's raw page-cache read
rate warm, 24-29 GB/s for 16 GB on the H100/H200 machines, whatever its extent size or
thread count: a dozen readers share the GIL for every preadv return, copy launch and
event. The same loop as C threads reached 41-49 GB/s on the H100 machine, at or above
what 16 Python threads read from the page cache with no copy at all
(bench/native_bounce_probe.c, docs/benchmarks.md). Being free of the GIL also lets it
read small chunks (2 MiB), which the GPU copies while they are still in the CPU's cache.

The library is compiled on first use into a per-user cache (keyed by the source's hash)
with `cc`; Triton already needs a C compiler at run time on GPU machines. Where none is
found, or `RTPLLM_NATIVE_LOADER=0`, `native_library()` is None and the loader uses the
Python ring. Pieces that need a cast, and O_DIRECT reads, stay in Python.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from rtpllm.loader.cuda_copy import mapped_cudart
from rtpllm.loader.destinations import dest_bytes
from rtpllm.loader.file_reader import CheckpointFile
from rtpllm.loader.load_plan import ALIGN, Extent
from rtpllm.loader.ring_loader import RingTimings
from rtpllm.loader.weights import CheckpointError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_ring.c")
# 2 MiB chunks, 4 per reader: the probe's best on the H100 machine (46-49 GB/s); a reader's
# 8 MiB of buffers stays in cache while the GPU reads it.
DEFAULT_CHUNK_BYTES = 2 << 20
DEFAULT_SLOTS = 4
_ERR_TRUNCATED, _ERR_READ = 1, 2


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The compiled reader loop, or None (no compiler, a failed build, or disabled)."""
    if os.environ.get("RTPLLM_NATIVE_LOADER", "1") == "0":
        return None
    try:
        path = _build()
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("native loader unavailable (%s); using the Python reader loop", exc)
        return None
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:  # e.g. a cached build for another libc
        log.info("cannot load the native loader %s (%s); using the Python reader loop", path, exc)
        return None
    fn = lib.rtp_ring_load
    # numpy arrays go in as they are; ndpointer checks their dtype and layout.
    i32p, i64p, u64p = (
        np.ctypeslib.ndpointer(dtype=t, flags="C_CONTIGUOUS") for t in (np.int32, np.int64, np.uint64)
    )
    fn.argtypes = [
        ctypes.c_char_p,  # cudart path, NULL for host destinations
        ctypes.c_int,  # device
        ctypes.c_int,  # files
        i32p,  # file fds
        i64p,  # file sizes
        ctypes.c_int64,  # extents
        i32p,  # extent file index
        i64p,  # extent offset
        i64p,  # extent bytes
        i64p,  # extent first piece (CSR, extents + 1)
        i64p,  # piece offset in its extent
        i64p,  # piece bytes
        u64p,  # piece destination address
        ctypes.c_int,  # threads
        ctypes.c_int64,  # chunk bytes
        ctypes.c_int,  # slots per reader
        ctypes.c_int,  # readahead hints for uncached extents
        ctypes.POINTER(ctypes.c_int64),  # done bytes (progress)
        ctypes.POINTER(ctypes.c_double),  # timings[6]
        ctypes.POINTER(ctypes.c_int64),  # err_info[4]
        ctypes.c_char_p,  # err message buffer
        ctypes.c_int,  # its length
    ]
    fn.restype = ctypes.c_int
    return lib


def _build() -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found; the loader uses its Python reader loop")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]
    from rtpllm.models.registry import cache_root  # here: models imports the loader

    cache = cache_root() / "native"
    target = cache / f"native_ring-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders (several engines starting
    # at once) each produce a whole file, and a reader never sees a partial one.
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(out), str(SOURCE), "-ldl"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        os.replace(out, target)
    log.info("built the native loader: %s", target)
    return target


def native_extents(extents: Sequence[Extent], device: torch.device) -> tuple[list[Extent], list[Extent]]:
    """(extents the native loop can run, the rest): it takes extents whose pieces all go
    unconverted into contiguous destinations on `device`."""
    mine, rest = [], []
    for e in extents:
        ok = all(p.tensor.direct and p.tensor.dest.device == device for p in e.pieces)
        (mine if ok else rest).append(e)
    return mine, rest


class NativeRing:
    """Runs `extents` through native_ring.c's readers; CUDA destinations on one device, or
    host destinations (device None: plain memcpy, used by tests)."""

    def __init__(
        self,
        extents: Sequence[Extent],
        files: dict[Path, CheckpointFile],
        *,
        device: torch.device | None,
        threads: int,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        slots: int = DEFAULT_SLOTS,
        readahead: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if chunk_bytes <= 0 or chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGN}, got {chunk_bytes}")
        lib = native_library()
        if lib is None:
            raise RuntimeError(
                "the native loader is not available (no C compiler, or RTPLLM_NATIVE_LOADER=0)"
            )
        self._fn = lib.rtp_ring_load
        self.extents, self.device, self.progress = list(extents), device, progress
        self.threads = max(1, min(threads, len(self.extents)))
        self.chunk_bytes, self.slots, self.readahead = chunk_bytes, slots, readahead
        self.paths = list(dict.fromkeys(e.path for e in self.extents))
        self.files = [files[p] for p in self.paths]
        if device is not None:
            torch.cuda.init()
            self.cudart = mapped_cudart()
            if self.cudart is None:
                raise RuntimeError("cannot find the CUDA runtime torch loaded")

    def run(self) -> RingTimings:
        timings = RingTimings(
            readers=self.threads,
            slots=self.threads * self.slots,
            slot_mib=self.chunk_bytes / 2**20,
            extents=len(self.extents),
            native=1,
        )
        if not self.extents:
            return timings
        t0 = time.perf_counter()
        index = {p: i for i, p in enumerate(self.paths)}
        pieces = [p for e in self.extents for p in e.pieces]
        # Destination addresses come from views the plan keeps alive for the whole load.
        bases = {t: dest_bytes(t).data_ptr() for t in dict.fromkeys(p.tensor for p in pieces)}
        first = np.zeros(len(self.extents) + 1, dtype=np.int64)  # CSR: extent -> its pieces
        np.cumsum([len(e.pieces) for e in self.extents], out=first[1:])
        done = ctypes.c_int64(0)
        out = (ctypes.c_double * 6)()
        err_info = (ctypes.c_int64 * 4)()
        err = ctypes.create_string_buffer(512)
        if self.device is not None:
            # Destinations were allocated (and maybe written) on torch's stream; the C
            # readers copy on streams of their own.
            torch.cuda.current_stream(self.device).synchronize()

        cudart = self.cudart.encode() if self.device is not None else None
        device_index = (self.device.index or 0) if self.device is not None else 0
        rc: list[int] = []

        def call() -> None:
            rc.append(
                self._fn(
                    cudart,
                    device_index,
                    len(self.files),
                    np.array([f.fd for f in self.files], dtype=np.int32),
                    np.array([f.size for f in self.files], dtype=np.int64),
                    len(self.extents),
                    np.array([index[e.path] for e in self.extents], dtype=np.int32),
                    np.array([e.offset for e in self.extents], dtype=np.int64),
                    np.array([e.nbytes for e in self.extents], dtype=np.int64),
                    first,
                    np.array([p.extent_offset for p in pieces], dtype=np.int64),
                    np.array([p.nbytes for p in pieces], dtype=np.int64),
                    np.array([bases[p.tensor] + p.tensor_offset for p in pieces], dtype=np.uint64),
                    self.threads,
                    self.chunk_bytes,
                    self.slots,
                    int(self.readahead),
                    ctypes.byref(done),
                    out,
                    err_info,
                    err,
                    len(err),
                )
            )

        if self.progress is None:
            call()  # ctypes releases the GIL for the call
        else:
            worker = threading.Thread(target=call, name="rtpllm-native-load", daemon=True)
            worker.start()
            while worker.is_alive():
                worker.join(0.05)
                self.progress(done.value)
            self.progress(done.value)
        if rc[0] != 0:
            raise self._error(err_info, err.value.decode(errors="replace"))
        timings.wall_s = time.perf_counter() - t0
        timings.alloc_s, timings.read_s, timings.slot_wait_s, timings.issue_s, timings.hint_s = out[:5]
        timings.hinted = int(out[5])
        return timings

    def _error(self, info: ctypes.Array, message: str) -> Exception:
        kind, file, offset, code = list(info)
        path = self.paths[file] if 0 <= file < len(self.paths) else None
        if kind == _ERR_TRUNCATED:
            return CheckpointError(
                f"{path} ended at byte {offset} while reading up to {code}: the file was truncated while loading"
            )
        if kind == _ERR_READ:
            return CheckpointError(f"cannot read {path} at offset {offset}: {message}")
        return RuntimeError(f"native loader: {message}")
