"""Restore throughput of each kvstore tier into engine KV memory.

    python bench/kv_tiers.py --device cpu                  # this CPU VM
    python bench/kv_tiers.py --device cuda --ssd-dir /nvme/kvtiers
    python bench/kv_tiers.py --smoke                       # tiny, seconds

Shape: Llama-3.1-8B's KV (32 layers, 8 KV heads, head_dim 128, bf16, block_size 16):
2 MiB per block, 256 blocks = 512 MiB (a 4096-token prompt). The blocks are encoded once
from a pool of random bits (encode GB/s reported too), then put in each tier:

- host:       TieredKVStore(host) after put_many.
- ssd (cold): an SSDTier in --ssd-dir (default: a temp dir); before every repeat the
              files' pages are dropped from the page cache (fsync + posix_fadvise
              DONTNEED on each file: no root needed, other work's cache untouched; with
              --drop-caches and root, /proc/sys/vm/drop_caches as well).
- ssd (warm): the same files, left in the page cache.
- redis:      a redis-server this script starts on a free port (no persistence).

A repeat times `store.get_many(keys)` + `decode_into(pool, ids, payloads, layout)`
(the store's path: SSD and Redis blocks are CRC-checked by their tier, promoted into
the host tier and decoded with verify_checksum=False; --verify checks the CRC again in
decode_into). For SSD and Redis the host tier is emptied before every repeat, so each
one reads the lower tier. Destination block ids are a random permutation of the pool (a
pool after churn). GB/s = payload bytes / time (1e9); median of --repeats after one
warm-up. After the last repeat every restored block is compared with its payload.
The table comes last; --json gets every number with date, machine and command.

For the TTFT half of the benchmark (engine restore vs recompute), build a `TierBench`
around the engine's own pool (`TierBench(layout, dst_kv=engine_pool)`) and call
`bench.restore_seconds(tier, num_blocks)`; or the module-level `restore_seconds(tier,
num_blocks)` for a throw-away Llama-3.1-8B-shaped one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import rtpllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))

from rtpllm.kvcache.block_hash import block_keys, namespace_key
from rtpllm.kvstore import HostTier, SSDTier, TieredKVStore, decode_into, encode_blocks
from rtpllm.kvstore.block_codec import block_payload_bytes, header_len
from rtpllm.runtime.processes import ManagedProcess, redis_server_binary, start_redis
from rtpllm.transfer.layout import KVLayout

TIERS = ("host", "ssd", "ssd-warm", "redis")


@dataclass(frozen=True)
class KVShape:
    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: str = "bfloat16"

    def layout(self, namespace: bytes) -> KVLayout:
        return KVLayout(namespace, self.layers, self.block_size, self.kv_heads, self.head_dim, self.dtype)


LLAMA_8B = KVShape()
SMOKE = KVShape(layers=2, kv_heads=2, head_dim=16, block_size=4)


def make_pool(layout: KVLayout, num_blocks: int, device: str, seed: int | None = None) -> torch.Tensor:
    """A pool of `num_blocks` (+ the scratch block); random bits if `seed` is given."""
    shape = (layout.num_layers, 2, num_blocks + 1, layout.block_size, layout.num_kv_heads, layout.head_dim)
    kv = torch.zeros(shape, dtype=layout.torch_dtype, device=device)
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
        kv.view(torch.int16 if kv.element_size() == 2 else torch.int32).random_(generator=gen)
    return kv


def drop_file_cache(paths: list[Path], global_drop: bool = False) -> str:
    """Evict `paths` from the page cache; returns how ("fadvise", "drop_caches", "warm")."""
    how = "warm"
    if hasattr(os, "posix_fadvise"):
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        how = "fadvise"
    if global_drop and os.access("/proc/sys/vm/drop_caches", os.W_OK):
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        how = "drop_caches"
    return how


class TierBench:
    """Blocks of one layout placed in each tier, restored into one destination pool.

    `dst_kv`: the pool to restore into (an engine's KVPool.kv), else one of
    `num_blocks` is made on `device`. The source blocks are random bits, encoded once.
    Starts (and stops) its own redis-server unless given `redis_url`; makes (and
    removes) a temp SSD directory unless given `ssd_dir`.
    """

    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        *,
        device: str = "cpu",
        dst_kv: torch.Tensor | None = None,
        ssd_dir: Path | None = None,
        redis_url: str | None = None,
        with_redis: bool = True,
        verify: bool = False,
        drop_caches: bool = False,
        seed: int = 0,
    ) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.verify = verify
        self.drop_caches = drop_caches
        self.cache_mode = "warm"
        self.dst = dst_kv if dst_kv is not None else make_pool(layout, num_blocks, device)
        layout.check_pool(self.dst)
        pool_blocks = self.dst.shape[2] - 1  # not the scratch block
        if pool_blocks < num_blocks:
            raise ValueError(f"the destination pool has {pool_blocks} blocks, {num_blocks} asked")
        gen = torch.Generator().manual_seed(seed)
        self.dst_ids = torch.randperm(pool_blocks, generator=gen)[:num_blocks].tolist()
        self.keys = block_keys(
            torch.randint(0, 32000, (num_blocks * layout.block_size,), generator=gen).tolist(),
            layout.block_size,
            layout.namespace,
        )
        src = make_pool(layout, num_blocks, str(self.dst.device), seed=seed + 1)
        start = time.perf_counter()
        self.payloads = encode_blocks(src, list(range(num_blocks)), layout)
        if src.is_cuda:
            torch.cuda.synchronize()
        self.encode_s = time.perf_counter() - start
        del src
        self.block_bytes = block_payload_bytes(layout)
        self.total_bytes = num_blocks * self.block_bytes
        host_capacity = 2 * num_blocks * len(self.payloads[0])  # promotions never evict here
        self._own_ssd_dir = ssd_dir is None
        self.ssd_dir = Path(tempfile.mkdtemp(prefix="kv-tiers-")) if ssd_dir is None else Path(ssd_dir)
        self._redis_proc: ManagedProcess | None = None
        self.redis_url = redis_url
        self.stores: dict[str, TieredKVStore] = {"host": TieredKVStore(HostTier(host_capacity))}
        self.stores["host"].put_many(self.keys, self.payloads)
        self.ssd = ssd = SSDTier(self.ssd_dir, capacity_bytes=host_capacity)
        ssd.put_many(list(zip(self.keys, self.payloads, strict=True)))
        self.stores["ssd"] = TieredKVStore(HostTier(host_capacity), ssd)
        self.stores["ssd-warm"] = self.stores["ssd"]
        if with_redis:
            from rtpllm.kvstore.redis_tier import RedisTier

            if self.redis_url is None:
                redis_server_binary()  # FileNotFoundError with a clear message
                self._redis_proc, self.redis_url = start_redis()
            redis_tier = RedisTier(self.redis_url, ttl_s=3600, prefix=b"bench:kv-tiers:")
            redis_tier.put_many(list(zip(self.keys, self.payloads, strict=True)))
            if redis_tier.stats.dropped_writes:
                raise RuntimeError(f"could not fill Redis at {self.redis_url}")
            self.stores["redis"] = TieredKVStore(HostTier(host_capacity), redis=redis_tier)
        self.last: dict[str, float] = {}

    def restore_seconds(self, tier: str, num_blocks: int) -> float:
        """Seconds to fetch the first `num_blocks` blocks from `tier` ("host", "ssd"
        (cold page cache), "ssd-warm", "redis") and decode them into the pool.
        `self.last` gets the split: fetch_s, decode_s."""
        if not 0 < num_blocks <= self.num_blocks:
            raise ValueError(f"num_blocks must be in [1, {self.num_blocks}]")
        store = self.stores[tier]
        keys = self.keys[:num_blocks]
        if tier != "host":
            store.host.clear()  # read the lower tier every time
        if tier == "ssd":
            assert store.ssd is not None
            self.cache_mode = drop_file_cache([store.ssd.path(k) for k in keys], self.drop_caches)
        if self.dst.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        payloads = store.get_many(keys)
        fetched = time.perf_counter()
        missing = sum(p is None for p in payloads)
        if missing:
            raise RuntimeError(f"{missing} of {num_blocks} blocks missing from the {tier} tier")
        decode_into(self.dst, self.dst_ids[:num_blocks], payloads, self.layout, verify_checksum=self.verify)  # type: ignore[arg-type]
        if self.dst.is_cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        self.last = {"fetch_s": fetched - start, "decode_s": end - fetched}
        return end - start

    def check_restored(self, num_blocks: int) -> bool:
        """Every restored block equals its payload, byte for byte."""
        hlen = header_len(self.layout)
        for block_id, payload in zip(self.dst_ids[:num_blocks], self.payloads, strict=False):
            got = self.dst[:, :, block_id].contiguous().cpu().view(-1).view(torch.uint8).numpy()
            if memoryview(got).cast("B") != memoryview(payload)[hlen:]:
                return False
        return True

    def close(self) -> None:
        for store in {id(s): s for s in self.stores.values()}.values():
            store.close()
        if self._redis_proc is not None:
            self._redis_proc.stop(5)
        if self._own_ssd_dir:
            shutil.rmtree(self.ssd_dir, ignore_errors=True)
        else:  # a directory of the caller's: take back only our own blocks
            for key in self.keys:
                self.ssd.delete(key)

    def __enter__(self) -> TierBench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restore_seconds(tier: str, num_blocks: int, bench: TierBench | None = None) -> float:
    """Seconds to restore `num_blocks` blocks from `tier` into a pool. Without `bench`, a
    throw-away Llama-3.1-8B-shaped CPU one is built around the call (minutes of setup
    for 256 blocks: pass a TierBench to time many calls)."""
    if bench is not None:
        return bench.restore_seconds(tier, num_blocks)
    layout = LLAMA_8B.layout(namespace_key("bench-kv-tiers", LLAMA_8B.dtype, LLAMA_8B.block_size))
    with TierBench(layout, num_blocks, with_redis=tier == "redis") as own:
        own.restore_seconds(tier, num_blocks)  # warm-up
        return own.restore_seconds(tier, num_blocks)


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = (
        SMOKE
        if args.smoke
        else KVShape(args.layers, args.kv_heads, args.head_dim, args.block_size, args.dtype)
    )
    layout = shape.layout(namespace_key("bench-kv-tiers", shape.dtype, shape.block_size))
    tiers = [t for t in args.tiers if t != "redis" or not args.no_redis]
    with_redis = "redis" in tiers
    if with_redis:
        try:
            redis_server_binary()
        except FileNotFoundError as exc:
            print(f"redis skipped: {exc}", file=sys.stderr)
            tiers.remove("redis")
            with_redis = False
    print(
        f"setting up {args.blocks} blocks of {block_payload_bytes(layout) / 2**20:.2f} MiB ...",
        file=sys.stderr,
    )
    results: dict[str, Any] = {}
    with TierBench(
        layout,
        args.blocks,
        device=args.device,
        ssd_dir=args.ssd_dir,
        with_redis=with_redis,
        verify=args.verify,
        drop_caches=args.drop_caches,
    ) as bench:
        results["encode"] = {"seconds": bench.encode_s, "gbps": bench.total_bytes / bench.encode_s / 1e9}
        for tier in tiers:
            print(f"{tier} ...", file=sys.stderr, flush=True)
            for _ in range(args.warmup):
                bench.restore_seconds(tier, args.blocks)
            times, fetch, decode = [], [], []
            for _ in range(args.repeats):
                times.append(bench.restore_seconds(tier, args.blocks))
                fetch.append(bench.last["fetch_s"])
                decode.append(bench.last["decode_s"])
            median = statistics.median(times)
            results[tier] = {
                "blocks": args.blocks,
                "bytes": bench.total_bytes,
                "seconds_median": median,
                "gbps_median": bench.total_bytes / median / 1e9,
                "gbps_samples": [bench.total_bytes / t / 1e9 for t in times],
                "fetch_ms_median": statistics.median(fetch) * 1e3,
                "decode_ms_median": statistics.median(decode) * 1e3,
                "page_cache": bench.cache_mode if tier == "ssd" else ("warm" if tier == "ssd-warm" else None),
                "verified": bench.check_restored(args.blocks),
            }
            print(f"  {results[tier]['gbps_median']:.2f} GB/s", file=sys.stderr, flush=True)
        results["stats"] = {tier: bench.stores[tier].stats() for tier in tiers}
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="device of the destination pool (cpu, cuda, cuda:1)")
    ap.add_argument("--tiers", default=",".join(TIERS), help=f"comma-separated subset of {','.join(TIERS)}")
    ap.add_argument("--blocks", type=int, default=256, help="blocks restored per repeat (256 = a 4K prompt)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ssd-dir", type=Path, default=None, help="SSD tier directory (default: a temp dir)")
    ap.add_argument(
        "--drop-caches",
        action="store_true",
        help="also drop the whole page cache (/proc/sys/vm/drop_caches, root only) before SSD repeats",
    )
    ap.add_argument("--no-redis", action="store_true", help="skip the Redis tier")
    ap.add_argument("--verify", action="store_true", help="decode_into checks every CRC again")
    ap.add_argument("--layers", type=int, default=LLAMA_8B.layers)
    ap.add_argument("--kv-heads", type=int, default=LLAMA_8B.kv_heads)
    ap.add_argument("--head-dim", type=int, default=LLAMA_8B.head_dim)
    ap.add_argument("--block-size", type=int, default=LLAMA_8B.block_size)
    ap.add_argument("--dtype", default=LLAMA_8B.dtype)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, CPU, 2 repeats: a seconds-long check")
    args = ap.parse_args(argv)
    args.tiers = [t for t in args.tiers.split(",") if t]
    unknown = set(args.tiers) - set(TIERS)
    if unknown:
        ap.error(f"unknown tiers: {sorted(unknown)}")
    if args.smoke:
        args.device, args.blocks, args.repeats, args.warmup = "cpu", 16, 2, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results = run(args)
    device_name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else (platform.processor() or "cpu")
    )
    payload = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv),
        "host": platform.node(),
        "device": device_name,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    print_table(args, results, device_name)
    return payload


def print_table(args: argparse.Namespace, results: dict[str, Any], device_name: str) -> None:
    shape = (
        "smoke shape"
        if args.smoke
        else (
            f"{args.layers} layers x {args.kv_heads} kv heads x {args.head_dim}, {args.dtype}, block {args.block_size}"
        )
    )
    enc = results["encode"]
    print()
    print(
        f"KV tier restore into a {args.device} pool ({device_name}): {args.blocks} blocks, {shape}; "
        f"median of {args.repeats}; encode {enc['gbps']:.2f} GB/s"
    )
    print(
        f"{'tier':<10} {'MiB':>8} {'GB/s':>7} {'min':>7} {'max':>7} {'fetch ms':>9} {'decode ms':>10} "
        f"{'page cache':>11} {'ok':>4}"
    )
    for tier in TIERS:
        row = results.get(tier)
        if row is None:
            continue
        samples = row["gbps_samples"]
        print(
            f"{tier:<10} {row['bytes'] / 2**20:>8.2f} {row['gbps_median']:>7.2f} {min(samples):>7.2f} "
            f"{max(samples):>7.2f} {row['fetch_ms_median']:>9.1f} {row['decode_ms_median']:>10.1f} "
            f"{row['page_cache'] or '-':>11} {'yes' if row['verified'] else 'NO':>4}"
        )


if __name__ == "__main__":
    main()
