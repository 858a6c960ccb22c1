"""How fast can a loader get pinned host memory? (issue 7: the ring of pinned slots)

    python bench/pinned_alloc.py --out pinned.json      # GPU machine, seconds

On the H100 machine of this workplace cudaHostAlloc pins ~0.6 GB/s (26 ms per 16 MiB
slot), so a 256 MiB ring costs as much as reading ~2 GB of checkpoint from the page
cache. This measures the ways to get page-locked memory for a ring of --slots slots of
--slot-mib MiB, each from fresh memory (the host allocator's cache emptied in between):

- torch pin_memory: torch.empty(pin_memory=True) per slot (cudaHostAlloc), one thread;
- torch pin_memory x N threads: the same from N threads at once;
- torch pin_memory, one block: one allocation of the whole ring;
- register 4K pages: anonymous mmap, touched, then cudaHostRegister (4 KiB pages);
- register THP: the same with madvise(MADV_HUGEPAGE) first (2 MiB pages where the kernel
  has them: far fewer pages to pin and map);
- register THP x N threads: the THP variant from N threads at once.

Then host -> device copy GB/s from each kind of memory (it must stay at the pinned rate).
The table comes last; --out gets every number.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import mmap
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HUGE = 2 << 20


class Registered:
    """Anonymous memory, optionally THP-advised, page-locked with cudaHostRegister."""

    def __init__(self, nbytes: int, *, huge: bool) -> None:
        # Over-allocate so the registered range starts on a 2 MiB boundary (THP needs it).
        self.map = mmap.mmap(-1, nbytes + HUGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.skip = -base % HUGE
        if huge and hasattr(mmap, "MADV_HUGEPAGE"):
            self.map.madvise(mmap.MADV_HUGEPAGE)
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)[self.skip : self.skip + nbytes]
        self.tensor[:: mmap.PAGESIZE].zero_()  # fault every page in before pinning
        self.ptr, self.nbytes = base + self.skip, nbytes
        err = torch.cuda.cudart().cudaHostRegister(self.ptr, nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister failed: {err}")

    def close(self) -> None:
        torch.cuda.cudart().cudaHostUnregister(self.ptr)
        del self.tensor
        self.map.close()


def empty_host_cache() -> None:
    fn = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


def timed(make: Callable[[], list[Any]]) -> tuple[float, list[Any]]:
    t0 = time.perf_counter()
    out = make()
    return time.perf_counter() - t0, out


def in_threads(n: int, slots: int, one: Callable[[], Any]) -> list[Any]:
    out: list[Any] = [None] * slots
    it = iter(range(slots))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            out[i] = one()

    pool = [threading.Thread(target=worker) for _ in range(n)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return out


def h2d_gbps(src: torch.Tensor, dst: torch.Tensor, repeats: int = 5) -> float:
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return repeats * src.numel() / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--slot-mib", type=int, default=16)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.zeros(1, device="cuda")
    slot = args.slot_mib << 20
    total = slot * args.slots

    def pinned() -> torch.Tensor:
        return torch.empty(slot, dtype=torch.uint8, pin_memory=True)

    methods: dict[str, Callable[[], list[Any]]] = {
        "torch pin_memory": lambda: [pinned() for _ in range(args.slots)],
        f"torch pin_memory x {args.threads} threads": lambda: in_threads(args.threads, args.slots, pinned),
        "torch pin_memory, one block": lambda: [torch.empty(total, dtype=torch.uint8, pin_memory=True)],
        "register 4K pages": lambda: [Registered(slot, huge=False) for _ in range(args.slots)],
        "register THP": lambda: [Registered(slot, huge=True) for _ in range(args.slots)],
        f"register THP x {args.threads} threads": lambda: in_threads(
            args.threads, args.slots, lambda: Registered(slot, huge=True)
        ),
        "register THP, one block": lambda: [Registered(total, huge=True)],
    }
    dst = torch.empty(slot, dtype=torch.uint8, device="cuda")
    rows: dict[str, dict[str, Any]] = {}
    for name, make in methods.items():
        empty_host_cache()
        try:
            seconds, bufs = timed(make)
        except Exception as exc:  # one failing method must not cost the others
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            print(f"{name}: {rows[name]['error']}", file=sys.stderr)
            continue
        first = bufs[0].tensor if isinstance(bufs[0], Registered) else bufs[0]
        rows[name] = {
            "seconds": seconds,
            "gbps": total / seconds / 1e9,
            "ms_per_slot": seconds / args.slots * 1e3,
            "h2d_gbps": h2d_gbps(first[:slot], dst),
            "pinned": bool(first.is_pinned()),
        }
        print(f"{name}: {rows[name]}", file=sys.stderr)
        for b in bufs:
            if isinstance(b, Registered):
                b.close()
        del bufs, first
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    payload = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "thp": thp.read_text().strip() if thp.exists() else None,
        "slots": args.slots,
        "slot_mib": args.slot_mib,
        "results": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(payload, indent=2))
    print(f"\n{args.slots} x {args.slot_mib} MiB ring, {payload['device']}, THP: {payload['thp']}")
    print(f"{'method':<36} {'s':>7} {'GB/s':>7} {'ms/slot':>8} {'H2D GB/s':>9}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<36} ERROR {r['error'][:80]}")
        else:
            print(
                f"{name:<36} {r['seconds']:7.3f} {r['gbps']:7.2f} {r['ms_per_slot']:8.2f} {r['h2d_gbps']:9.1f}"
            )


if __name__ == "__main__":
    main()
