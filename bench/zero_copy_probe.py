"""Can the GPU read a checkpoint straight from the page cache? (issue 7, next step)

    python bench/zero_copy_probe.py --out probe.json     # GPU machine, ~1 min

The ring loader bounces every byte through a pinned buffer: page cache -> pinned (a
read and a write of host memory) -> GPU (a read), which bounds it near 2/3 of the
machine's raw memcpy rate (docs/benchmarks.md). This measures the alternative: mmap the
file, page-lock each chunk of the page cache with cudaHostRegister (read-only), copy
it to the GPU with cudaMemcpyAsync, unregister. Host memory is read once, but every
4 KiB page is pinned and mapped for the device.

Writes a --gb file of filler bytes (left in the page cache), then for each thread count
and chunk size: N threads take chunks in file order, each with its own stream and two
chunks in flight (register the next while the last one copies). Reports GB/s, and the
share of time in cudaHostRegister. Bounce reads (preadv into a pinned buffer, then the
same copy) run the same way for comparison. The table comes last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import rtpllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))

from rtpllm.loader.cuda_copy import cuda_runtime
from rtpllm.loader.pinned import PinnedBuffer

READ_ONLY, PORTABLE = 8, 1  # cudaHostRegisterReadOnly, cudaHostRegisterPortable


def write_file(path: Path, nbytes: int) -> None:
    if path.exists() and path.stat().st_size == nbytes:
        return
    block = bytes(range(256)) * (4 << 12)  # 4 MiB
    with path.open("wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)


def run(path: Path, threads: int, chunk: int, mode: str) -> dict[str, float]:
    rt = cuda_runtime()
    assert rt is not None
    cudart = torch.cuda.cudart()
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    offsets = iter(range(0, size, chunk))
    lock = threading.Lock()
    reg_s = [0.0] * threads
    errors: list[BaseException] = []
    flags = [READ_ONLY | PORTABLE]

    def worker(i: int) -> None:
        try:
            torch.cuda.set_device(0)
            stream = torch.cuda.Stream()
            scratch = torch.empty(chunk, dtype=torch.uint8, device="cuda")
            bounce = [PinnedBuffer(chunk) for _ in range(2)] if mode == "bounce" else []
            inflight: list[tuple[torch.cuda.Event, int, int]] = []  # (event, address registered or -1, slot)
            turn = 0
            while True:
                with lock:
                    off = next(offsets, None)
                if off is None:
                    break
                n = min(chunk, size - off)
                if len(inflight) == 2:
                    ev, addr, _ = inflight.pop(0)
                    ev.synchronize()
                    if addr >= 0:
                        cudart.cudaHostUnregister(addr)
                if mode == "register":
                    t0 = time.perf_counter()
                    err = int(cudart.cudaHostRegister(base + off, n, flags[0]))
                    if err != 0 and flags[0] != PORTABLE:
                        flags[0] = PORTABLE  # no read-only registration here
                        err = int(cudart.cudaHostRegister(base + off, n, flags[0]))
                    if err != 0:
                        raise RuntimeError(f"cudaHostRegister: {err}")
                    reg_s[i] += time.perf_counter() - t0
                    src, registered = base + off, base + off
                else:
                    buf = bounce[turn % 2].tensor
                    view = memoryview(buf.numpy())
                    got = 0
                    while got < n:
                        got += os.preadv(fd, [view[got:n]], off + got)
                    src, registered = buf.data_ptr(), -1
                rt.copy_h2d(scratch.data_ptr(), src, n, stream.cuda_stream)
                ev = torch.cuda.Event()
                ev.record(stream)
                inflight.append((ev, registered, turn % 2))
                turn += 1
            for ev, addr, _ in inflight:
                ev.synchronize()
                if addr >= 0:
                    cudart.cudaHostUnregister(addr)
            for b in bounce:
                b.close()
        except BaseException as exc:
            errors.append(exc)

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - t0
    mm.close()
    os.close(fd)
    if errors:
        raise errors[0]
    return {
        "seconds": seconds,
        "gbps": size / seconds / 1e9,
        "register_share": sum(reg_s) / threads / seconds,
        "flags": flags[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=Path("/tmp/zero-copy-probe.bin"))
    ap.add_argument("--gb", type=float, default=8.0)
    ap.add_argument("--threads", default="4,8,12,16")
    ap.add_argument("--chunk-mib", default="8,32")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.zeros(1, device="cuda")
    write_file(args.file, int(args.gb * 1e9) // (4 << 20) * (4 << 20))
    rows: list[dict[str, Any]] = []
    for mode in ("bounce", "register"):
        for chunk in [int(c) << 20 for c in args.chunk_mib.split(",")]:
            for threads in [int(t) for t in args.threads.split(",")]:
                run(args.file, threads, chunk, mode)  # warm-up: page cache, allocations
                try:
                    r = run(args.file, threads, chunk, mode)
                except Exception as exc:  # one failing mode must not cost the others
                    r = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                rows.append({"mode": mode, "threads": threads, "chunk_mib": chunk >> 20, **r})
                print(rows[-1], file=sys.stderr)
    payload = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "file_bytes": args.file.stat().st_size,
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(payload, indent=2))
    print(f"\n{payload['file_bytes'] / 1e9:.1f} GB from the page cache to {payload['device']}")
    print(f"{'mode':<9} {'threads':>7} {'chunk MiB':>9} {'GB/s':>7} {'in register':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<9} {r['threads']:>7} {r['chunk_mib']:>9} ERROR {r['error'][:70]}")
        else:
            print(
                f"{r['mode']:<9} {r['threads']:>7} {r['chunk_mib']:>9} {r['gbps']:7.1f} {r['register_share']:11.0%}"
            )


if __name__ == "__main__":
    main()
