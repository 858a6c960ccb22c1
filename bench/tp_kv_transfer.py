"""KV moves out of and into a tensor-parallel engine's pool, against TP=1 (CPU, gloo).

    python bench/tp_kv_transfer.py                       # the tables of docs/tensor_parallel.md
    python bench/tp_kv_transfer.py --tp 4 --backends shm
    python bench/tp_kv_transfer.py --smoke               # tiny, seconds (tests/unit/test_bench_tp_kv_transfer_smoke.py)

A random fp32 Llama (`--layers`, `--kv-heads`, `--head-dim`; written to a temporary
directory unless `--model DIR`), one TP=1 and one TP=N engine of it on the CPU (the TP=N
engine's other ranks are worker processes). Everything goes through the engines' own
views of their pools, `LLMEngine.kv_blocks()`: `PoolBlocks` for TP=1, `ShardedPoolBlocks`
for TP=N (every rank's KV heads gathered to and scattered from rank 0 over the gloo KV
group). The blocks are a `--tokens` prompt's, random KV; the TP=1 pool takes the TP=N
namespace (the bytes of a block are the same, only the namespace names the TP size).

- **transfer**: one PD transfer of all the blocks in one `send()` (`KVSender` ->
  `KVReceiver`, sender and receiver in this process, as tests/unit/test_tp_kv_transfer.py
  runs them), open() to the receiver's wait(), per backend, in three directions:
  TP=1 -> TP=1 (into a second TP=1 pool), TP=N -> TP=1 (sending pool sharded),
  TP=1 -> TP=N (receiving pool sharded). The received blocks are compared with the sent
  ones afterwards, bit for bit.
- **view**: the payload of one layer of those blocks gathered (`KVBlocks.gather`) and
  scattered (`KVBlocks.scatter`), per layer: what a transfer adds per frame.
- **tiers**: what the KV tiers do with the blocks (kvstore/block_codec.py): store =
  `encode_blocks` (TP=1: straight from the pool tensor; TP=N: whole blocks read through
  the view, every layer in one operation of the KV group), of all the blocks and of one
  block (a step's write-through); restore = `decode_into` of all of them into other
  blocks (payloads checked already, as the tiers hand them over). The engine runs a
  store on its step loop (LocalKVStore; RemoteKVStore's outbox copy is the same read).

Warm-up rounds first (connections, rings, the workers' first collectives), then the
median of `--repeats` (min and max shown). The tables come last; `--json` gets every
number with date, machine and command.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import rtpllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kv_transfer import cpu_name
from rtpllm import LLM
from rtpllm.kvstore.block_codec import decode_into, encode_blocks
from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.transfer import KVLayout, KVReceiver, KVSender
from rtpllm.transfer.blocks import KVBlocks, PoolBlocks
from rtpllm.transfer.endpoint import shm_available


def checkpoint(args: argparse.Namespace, root: Path) -> Path:
    """The model: `--model`, or a random Llama of the asked KV shape under `root`."""
    if args.model:
        return Path(args.model)
    heads = args.kv_heads * args.q_per_kv
    return write_random_checkpoint(
        root / "llama", "llama", hidden_size=heads * args.head_dim, num_attention_heads=heads,
        num_key_value_heads=args.kv_heads, num_hidden_layers=args.layers, intermediate_size=2 * heads * args.head_dim,
        vocab_size=320, max_position_embeddings=max(2 * args.tokens, 128),
    )  # fmt: skip


def stats_ms(samples: list[float]) -> dict[str, Any]:
    ms = [s * 1e3 for s in samples]
    return {"ms_median": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms), "ms_samples": ms}


def layer_payloads(blocks: KVBlocks, ids: list[int]) -> list[torch.Tensor]:
    """Every layer's payload of blocks `ids`, gathered (bytes)."""
    out = []
    for layer in range(blocks.layout.num_layers):
        buf = blocks.host_buffer(blocks.payload_bytes(len(ids), layer))
        blocks.gather(layer, np.asarray(ids, dtype=np.int64), buf)
        out.append(buf.clone())
    return out


def fill_random(blocks: KVBlocks, ids: list[int], seed: int) -> None:
    """Random KV (randn, the pool's dtype) into blocks `ids` of every layer, through the view."""
    gen = torch.Generator().manual_seed(seed)
    lay = blocks.layout
    for layer in range(lay.num_layers):
        values = torch.randn(blocks.payload_bytes(len(ids), layer) // lay.torch_dtype.itemsize, generator=gen)
        blocks.scatter(layer, np.asarray(ids, dtype=np.int64), values.to(lay.torch_dtype).view(torch.uint8), None)


async def ship(src: KVBlocks, src_ids: list[int], dst: KVBlocks, dst_ids: list[int], backend: str, rounds: int) -> list[float]:
    """`rounds` transfers of blocks `src_ids` into `dst_ids`: seconds each, open() to wait()."""
    receiver = KVReceiver(dst, backends=[backend])
    await receiver.start()
    sender = KVSender(src, prefer=[backend])
    times = []
    try:
        for i in range(rounds):
            incoming = receiver.expect(f"t{i}", dst_ids, lease_s=120)
            start = time.perf_counter()
            out = await sender.open(receiver.endpoint, f"t{i}", len(dst_ids), 120, token=incoming.token)
            if out.backend != backend:
                raise RuntimeError(f"asked for {backend}, got {out.backend}")
            await out.send(np.asarray(src_ids, dtype=np.int64), 0)
            await out.finish()
            await incoming.wait()
            times.append(time.perf_counter() - start)
    finally:
        await sender.close()
        await receiver.close()
    return times


def timed(fn: Callable[[], None], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


class Engines:
    """A TP=1 and a TP=N engine of one model, their pools' views and the blocks moved."""

    def __init__(self, args: argparse.Namespace, model: Path) -> None:
        n = args.tokens // args.block_size
        engine = {"device": "cpu", "block_size": args.block_size, "num_blocks": 2 * n + 8, "max_model_len": args.tokens}
        self.one = LLM(str(model), **engine)  # type: ignore[arg-type]
        self.many = LLM(str(model), tensor_parallel_size=args.tp, **engine)  # type: ignore[arg-type]
        self.sharded = self.many.engine.kv_blocks()
        namespace = self.sharded.layout.namespace
        kv = self.one.engine.kv_pool.kv
        assert kv is not None
        self.plain = PoolBlocks(kv, KVLayout.of(kv, namespace))  # the TP=1 pool, the TP=N namespace
        other = torch.zeros_like(kv)
        self.plain_dst = PoolBlocks(other, KVLayout.of(other, namespace))  # a second TP=1 pool
        self.src_ids, self.dst_ids = list(range(n)), list(range(n, 2 * n))
        fill_random(self.plain, self.src_ids, seed=1)
        fill_random(self.sharded, self.src_ids, seed=2)

    def close(self) -> None:
        self.many.close()
        self.one.close()


def bench_transfers(args: argparse.Namespace, e: Engines) -> dict[str, Any]:
    directions = {
        "TP=1 -> TP=1": (e.plain, e.plain_dst),
        f"TP={args.tp} -> TP=1": (e.sharded, e.plain_dst),
        f"TP=1 -> TP={args.tp}": (e.plain, e.sharded),
    }
    results: dict[str, Any] = {}
    for backend in args.backends:
        results[backend] = {}
        for name, (src, dst) in directions.items():
            print(f"transfer {backend} {name} ...", file=sys.stderr, flush=True)
            times = asyncio.run(ship(src, e.src_ids, dst, e.dst_ids, backend, args.warmup + args.repeats))
            verified = all(
                torch.equal(a, b)
                for a, b in zip(layer_payloads(src, e.src_ids), layer_payloads(dst, e.dst_ids), strict=True)
            )
            nbytes = len(e.src_ids) * src.block_bytes
            row = {**stats_ms(times[args.warmup :]), "mib": nbytes / 2**20, "verified": verified}
            row["gbps_median"] = nbytes / (row["ms_median"] / 1e3) / 1e9
            results[backend][name] = row
    return results


def bench_view(args: argparse.Namespace, e: Engines) -> dict[str, Any]:
    """Gather and scatter of one layer's payload of the blocks, per layer."""
    results: dict[str, Any] = {}
    ids = np.asarray(e.src_ids, dtype=np.int64)
    dst_ids = np.asarray(e.dst_ids, dtype=np.int64)  # scattered into: what the transfers left there is spent
    for name, blocks in (("TP=1", e.plain), (f"TP={args.tp}", e.sharded)):
        buf = blocks.host_buffer(blocks.payload_bytes(len(ids), 0))

        def gather(blocks: KVBlocks = blocks, buf: torch.Tensor = buf) -> None:
            for layer in range(blocks.layout.num_layers):
                blocks.gather(layer, ids, buf)

        def scatter(blocks: KVBlocks = blocks, buf: torch.Tensor = buf) -> None:
            for layer in range(blocks.layout.num_layers):
                blocks.scatter(layer, dst_ids, buf, None)

        gather()
        row = {}
        for op, fn in (("gather", gather), ("scatter", scatter)):
            times = timed(fn, args.warmup, args.repeats)
            row[op] = stats_ms([t / blocks.layout.num_layers for t in times])
        row["layer_mib"] = blocks.payload_bytes(len(ids), 0) / 2**20
        results[name] = row
    return results


def bench_tiers(args: argparse.Namespace, e: Engines) -> dict[str, Any]:
    """The tiers' store (encode) and restore (decode) of the blocks, TP=1 vs TP=N."""
    layout = e.sharded.layout  # the TP=1 pool takes the TP=N namespace (see the module doc)
    size = e.sharded.block_bytes
    src, dst = e.src_ids, e.dst_ids
    results: dict[str, Any] = {}
    # TP=1: the pool tensor itself, as the engine hands it to its tiers; TP=N: the view.
    for name, pool in (("TP=1", e.plain.kv), (f"TP={args.tp}", e.sharded)):

        def store(pool: torch.Tensor | KVBlocks = pool, ids: list[int] = src) -> list[bytes]:
            return encode_blocks(pool, ids, layout)

        payloads = store()

        def restore(pool: torch.Tensor | KVBlocks = pool, payloads: list[bytes] = payloads) -> None:
            decode_into(pool, dst, payloads, layout, verify_checksum=False)

        row: dict[str, Any] = {
            "block_kib": size / 1024,
            "store": stats_ms(timed(store, args.warmup, args.repeats)),
            "store_1": stats_ms(timed(lambda store=store: store(ids=src[:1]), args.warmup, args.repeats)),
            "restore": stats_ms(timed(restore, args.warmup, args.repeats)),
        }
        # Whole blocks of `size` bytes; restored, they encode to the same payloads.
        back = encode_blocks(pool, dst, layout)
        row["verified"] = all(len(x) == len(payloads[0]) for x in payloads) and [x[-size:] for x in back] == [
            x[-size:] for x in payloads
        ]
        results[name] = row
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the sharded engine")
    ap.add_argument("--backends", default=None, help="comma-separated subset of shm,tcp (default: both where shm works)")
    ap.add_argument("--tokens", type=int, default=1024, help="prompt length (blocks = tokens / block size)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--q-per-kv", type=int, default=1, help="attention heads per KV head")
    ap.add_argument("--model", default=None, help="a model directory instead of the random Llama (its KV shape wins)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each process (ranks share the cores)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 2 repeats: a seconds-long check")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens, args.layers, args.kv_heads, args.head_dim, args.q_per_kv = 64, 2, 2, 16, 2
        args.repeats, args.warmup = 2, 1
    default = "shm,tcp" if shm_available() else "tcp"
    args.backends = (args.backends or default).split(",")
    if args.tokens % args.block_size:
        ap.error("--tokens must be a multiple of --block-size")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    # Before the engines: the TP workers take rank 0's thread count.
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="rtpllm-tp-kv-") as root:
            engines = Engines(args, checkpoint(args, Path(root)))
            try:
                results = {
                    "transfer": bench_transfers(args, engines),
                    "view": bench_view(args, engines),
                    "tiers": bench_tiers(args, engines),
                }
                layout = engines.sharded.layout
            finally:
                engines.close()
    finally:
        torch.set_num_threads(threads)
    shape = {
        "layers": layout.num_layers, "kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
        "dtype": layout.dtype, "block_size": layout.block_size, "blocks": args.tokens // args.block_size,
    }  # fmt: skip
    payload = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/tp_kv_transfer.py", *(sys.argv[1:] if argv is None else argv)]),
        "host": platform.node(),
        "device": cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "shape": shape,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    print_tables(args, shape, results)
    return payload


def print_tables(args: argparse.Namespace, shape: dict[str, Any], results: dict[str, Any]) -> None:
    print()
    print(
        f"KV of {args.tokens} tokens = {shape['blocks']} blocks of {shape['block_size']}: {shape['layers']} layers x "
        f"{shape['kv_heads']} KV heads x {shape['head_dim']}, {shape['dtype']}; TP=1 vs TP={args.tp} on the CPU "
        f"(gloo), {args.threads} torch thread(s) per process; median of {args.repeats} after {args.warmup} warm-up"
    )
    print(f"{'view (per layer)':<20} {'MiB':>6} {'gather ms':>10} {'min':>7} {'max':>7} {'scatter ms':>11} {'min':>7} {'max':>7}")
    for name, row in results["view"].items():
        g, s = row["gather"], row["scatter"]
        print(
            f"{name:<20} {row['layer_mib']:>6.1f} {g['ms_median']:>10.2f} {g['ms_min']:>7.2f} {g['ms_max']:>7.2f} "
            f"{s['ms_median']:>11.2f} {s['ms_min']:>7.2f} {s['ms_max']:>7.2f}"
        )
    n = shape["blocks"]
    print(
        f"{'tiers':<20} {'KiB/blk':>7} {f'store {n} ms':>13} {'min':>7} {'max':>7} {'store 1 ms':>11} "
        f"{f'restore {n} ms':>15} {'min':>7} {'max':>7} {'ok':>4}"
    )
    for name, row in results["tiers"].items():
        st, one, re_ = row["store"], row["store_1"], row["restore"]
        print(
            f"{name:<20} {row['block_kib']:>7.0f} {st['ms_median']:>13.2f} {st['ms_min']:>7.2f} {st['ms_max']:>7.2f} "
            f"{one['ms_median']:>11.2f} {re_['ms_median']:>15.2f} {re_['ms_min']:>7.2f} {re_['ms_max']:>7.2f} "
            f"{'yes' if row['verified'] else 'NO':>4}"
        )
    print(f"{'transfer':<24} {'MiB':>6} {'ms':>8} {'min':>8} {'max':>8} {'GB/s':>6} {'ok':>4}")
    for backend, rows in results["transfer"].items():
        for name, row in rows.items():
            print(
                f"{backend + ' ' + name:<24} {row['mib']:>6.1f} {row['ms_median']:>8.1f} {row['ms_min']:>8.1f} "
                f"{row['ms_max']:>8.1f} {row['gbps_median']:>6.2f} {'yes' if row['verified'] else 'NO':>4}"
            )


if __name__ == "__main__":
    main()
