"""KV data-plane throughput: one prefill->decode transfer per repeat, per backend.

    python bench/kv_transfer.py --device cpu --backends tcp,shm           # this CPU VM
    python bench/kv_transfer.py --device cuda --backends tcp,shm,cuda_ipc  # one GPU
    python bench/kv_transfer.py --device cuda --recv-device cuda:1 --backends cuda_ipc,shm   # two GPUs
    python bench/kv_transfer.py --smoke                                    # tiny, seconds

Shape: Llama-3.1-8B's KV (32 layers, 8 KV heads, head_dim 128, bf16, block_size 16): a
4096-token prompt is 256 blocks = 512 MiB. The receiver (KVReceiver) runs in a spawned
process with its own pool; the sender (KVSender) in this one. Each repeat: the receiver
expects the transfer, the sender opens it, sends all blocks in `--sends` calls and
finishes; the time is open() to finish() (all blocks verified and landed). GB/s = payload
bytes / that time (1e9). Warm-up transfers first (connections, rings, page faults), then
the median of `--repeats`. Block ids are a random permutation on both sides by default
(a pool after churn), `--ids contiguous` for a fresh pool. After the last repeat the
receiver's blocks are compared with the sender's (CRC-32 of each). The table comes last;
--json gets every number with date, machine and command.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

try:
    import rtpllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))

from rtpllm.transfer import KVLayout, KVReceiver, KVSender

NAMESPACE = b"bench-kv-transfer"


def make_pool(args: argparse.Namespace, device: str, seed: int) -> torch.Tensor:
    blocks = args.tokens // args.block_size
    shape = (args.layers, 2, blocks + 1, args.block_size, args.kv_heads, args.head_dim)
    kv = torch.empty(shape, dtype=getattr(torch, args.dtype), device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    # Random bits, not randn: cheap to make and every bit pattern (NaN too) must survive.
    kv.view(torch.int16 if kv.element_size() == 2 else torch.int32).random_(generator=gen)
    return kv


def block_ids(args: argparse.Namespace, seed: int) -> list[int]:
    blocks = args.tokens // args.block_size
    if args.ids == "contiguous":
        return list(range(blocks))
    return torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)).tolist()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def block_crcs(kv: torch.Tensor, ids: list[int]) -> list[int]:
    out = []
    for b in ids:
        data = kv[:, :, b].contiguous().cpu().view(-1).view(torch.uint8).numpy()
        out.append(zlib.crc32(memoryview(data)))
    return out


# -------------------------------------------------------------------- receiver process


def receiver_main(conn: Any, args: argparse.Namespace, device: str) -> None:
    torch.set_num_threads(1)
    asyncio.run(_receive(conn, args, device))


async def _receive(conn: Any, args: argparse.Namespace, device: str) -> None:
    loop = asyncio.get_running_loop()
    kv = make_pool(args, device, seed=1)
    kv.zero_()
    receiver = KVReceiver(
        kv,
        KVLayout.of(kv, NAMESPACE),
        threads=args.threads,
        max_pending_frames=args.pending,
        shm_slots=args.pending,
    )
    await receiver.start()
    conn.send(receiver.endpoint)
    while True:
        cmd, *rest = await loop.run_in_executor(None, conn.recv)
        if cmd == "expect":
            transfer_id, ids = rest
            incoming = receiver.expect(transfer_id, ids, lease_s=120.0)
            conn.send(("ready", incoming.token))  # the one-time token, as NATS would carry it
            cpu = cpu_seconds()
            try:
                stats = await incoming.wait()
                conn.send(("done", stats.seconds, stats.nbytes, cpu_seconds() - cpu))
            except Exception as exc:  # noqa: BLE001 -- reported to the parent
                conn.send(("error", repr(exc)))
        elif cmd == "crcs":
            conn.send(block_crcs(kv, rest[0]))
        else:
            break
    await receiver.close()


# ------------------------------------------------------------------------------ sender


async def run_backend(
    args: argparse.Namespace, conn: Any, endpoint: Any, sender: KVSender, backend: str
) -> dict[str, Any]:
    src_ids = block_ids(args, seed=2)
    dst_ids = block_ids(args, seed=3)
    n = len(src_ids)
    chunk = -(-n // args.sends)
    samples, recv_samples, cpu_send, cpu_recv = [], [], [], []
    for i in range(args.warmup + args.repeats):
        tid = f"{backend}-{i}"
        conn.send(("expect", tid, dst_ids))
        ready, token = conn.recv()
        assert ready == "ready"
        cpu = cpu_seconds()
        start = time.perf_counter()
        out = await sender.open(endpoint, tid, n, timeout_s=60.0, token=token)
        if out.backend != backend:
            raise RuntimeError(f"asked for {backend}, got {out.backend}")
        for pos in range(0, n, chunk):
            await out.send(src_ids[pos : pos + chunk], pos)
        stats = await out.finish()
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds() - cpu
        reply = conn.recv()
        if reply[0] != "done":
            raise RuntimeError(f"receiver failed: {reply[1]}")
        if i >= args.warmup:
            samples.append(stats.nbytes / elapsed / 1e9)
            recv_samples.append(reply[2] / reply[1] / 1e9)
            cpu_send.append(cpu / (stats.nbytes / 1e9))
            cpu_recv.append(reply[3] / (stats.nbytes / 1e9))
    conn.send(("crcs", dst_ids))
    ok = conn.recv() == block_crcs(sender.pool.kv, src_ids)
    return {
        "blocks": n,
        "mib": stats.nbytes / 2**20,
        "gbps_median": statistics.median(samples),
        "gbps_min": min(samples),
        "gbps_max": max(samples),
        "gbps_samples": samples,
        "receiver_gbps_median": statistics.median(recv_samples),
        # CPU seconds (all threads) per GB moved: on a CPU-bound host, what limits GB/s.
        "sender_cpu_s_per_gb": statistics.median(cpu_send),
        "receiver_cpu_s_per_gb": statistics.median(cpu_recv),
        "verified": ok,
    }


async def bench(args: argparse.Namespace, conn: Any, endpoint: Any) -> dict[str, Any]:
    kv = make_pool(args, args.device, seed=0)
    results = {}
    for backend in args.backends:
        print(f"{backend} ...", file=sys.stderr, flush=True)
        sender = KVSender(
            kv,
            KVLayout.of(kv, NAMESPACE),
            prefer=[backend],
            max_frame_bytes=args.frame_mib << 20,
            threads=args.threads,
        )
        try:
            results[backend] = await run_backend(args, conn, endpoint, sender, backend)
        except Exception as exc:  # noqa: BLE001 -- reported in the table
            results[backend] = {"error": repr(exc)}
        finally:
            await sender.close()
        row = results[backend]
        if "error" not in row:
            print(f"  {row['gbps_median']:.2f} GB/s", file=sys.stderr, flush=True)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="tcp,shm", help="comma-separated subset of tcp,shm,cuda_ipc")
    ap.add_argument(
        "--device", default="cpu", help="sender pool device (and receiver's, unless --recv-device)"
    )
    ap.add_argument("--recv-device", default=None, help="receiver pool device, e.g. cuda:1")
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length (blocks = tokens / block size)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sends", type=int, default=1, help="send() calls per transfer (chunked prefill)")
    ap.add_argument(
        "--ids", default="random", choices=["random", "contiguous"], help="block ids on both sides"
    )
    ap.add_argument("--frame-mib", type=int, default=16, help="KVSender max_frame_bytes, in MiB")
    ap.add_argument("--threads", type=int, default=2, help="worker threads of the sender and of the receiver")
    ap.add_argument(
        "--pending", type=int, default=4, help="receiver: frames in flight per connection (and shm slots)"
    )
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, CPU, 2 repeats: a seconds-long check")
    args = ap.parse_args(argv)
    args.backends = args.backends.split(",")
    if args.smoke:
        args.device, args.recv_device = "cpu", None
        args.tokens, args.layers, args.kv_heads, args.head_dim = 128, 2, 2, 16
        args.repeats, args.warmup, args.sends = 2, 1, 2
    args.recv_device = args.recv_device or args.device
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # gathers run on the transfer's own worker threads
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child, args, args.recv_device), daemon=True)
    proc.start()
    try:
        endpoint = parent.recv()
        results = asyncio.run(bench(args, parent, endpoint))
        parent.send(("quit",))
    finally:
        torch.set_num_threads(threads)
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    payload = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/kv_transfer.py", *(sys.argv[1:] if argv is None else argv)]),
        "host": platform.node(),
        "device": device_name,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    print_table(args, results)
    return payload


def print_table(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    print()
    print(
        f"KV transfer: {args.tokens} tokens, {args.layers} layers x {args.kv_heads} kv heads x {args.head_dim}, "
        f"{args.dtype}, block {args.block_size}; {args.device} -> {args.recv_device}; ids {args.ids}; "
        f"{args.sends} send() call(s); median of {args.repeats}"
    )
    print(
        f"{'backend':<10} {'blocks':>7} {'MiB':>8} {'GB/s':>7} {'min':>7} {'max':>7} {'recv GB/s':>10} "
        f"{'cpu s/GB send':>14} {'recv':>6} {'ok':>4}"
    )
    for name, row in results.items():
        if "error" in row:
            print(f"{name:<10} ERROR {row['error'][:90]}")
            continue
        print(
            f"{name:<10} {row['blocks']:>7} {row['mib']:>8.1f} {row['gbps_median']:>7.2f} {row['gbps_min']:>7.2f} "
            f"{row['gbps_max']:>7.2f} {row['receiver_gbps_median']:>10.2f} {row['sender_cpu_s_per_gb']:>14.2f} "
            f"{row['receiver_cpu_s_per_gb']:>6.2f} {'yes' if row['verified'] else 'NO':>4}"
        )


if __name__ == "__main__":
    main()
