"""KV tiers (issue 6): restore throughput of each tier into KV memory, and (--ttft) the
time to first token of a prompt served from each tier vs recomputed, by the engine.

    python bench/kv_tiers.py --device cpu                  # restore half, this CPU VM
    python bench/kv_tiers.py --device cuda --ttft          # both halves, Llama-3.1-8B shape
    python bench/kv_tiers.py --device cuda --ttft-only     # the TTFT half alone
    python bench/kv_tiers.py --smoke --ttft                # tiny, seconds, CPU

Restore half. Shape: Llama-3.1-8B's KV (32 layers, 8 KV heads, head_dim 128, bf16,
block_size 16): 2 MiB per block, 256 blocks = 512 MiB (a 4096-token prompt). The blocks
are encoded once from a pool of random bits (encode GB/s reported too), then put in
each tier:

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

TTFT half (--ttft). An engine on random weights (`load_format="dummy"`; --ttft-shape
llama8b on CUDA, tiny on CPU) with host, SSD (under --ssd-dir) and Redis (its own
redis-server) tiers, no write-through, one prefill step for the whole prompt. After
--ttft-warmup whole prompts (kernels compiled, prefill speed learned):

- recompute:  TTFT of a new random --ttft-tokens prompt (4096), alone on the engine.
- per tier:   a new random prompt is computed once, the KV of its full blocks (all but
              the last token's: 255 blocks = 510 MiB for the 8B shape) is put in that
              tier only (ssd: pages dropped as above; ssd-warm: left cached), the pool's
              prefix cache is emptied, and the prompt's TTFT is timed twice over:
              restore forced (`KVOffload.use_cost_model = False`; every block checked to
              come from the tier) and as the cost model decides (tier GB/s configured:
              OffloadConfig's defaults or --gb-per-s; prefill speed learned).

TTFT = wall time of `LLM.generate([prompt], max_tokens=1)`, the device idle at the
start; median of --ttft-repeats (3), each a new prompt. The table shows per tier the
forced restore's TTFT (and bytes/TTFT), recompute's, the faster, the cost model's
choice with its TTFT, and whether the choice was right ("close": within 10%); above it
the learned prefill speed next to the one the recompute TTFT gives, and the tier
bandwidth above which the cost model restores. A tier slower than recompute must show
"recompute" there.

Tables come last; --json gets every number with date, machine and command.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
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

from rtpllm import LLM, SamplingParams
from rtpllm.config import OffloadConfig
from rtpllm.engine.kv_offload import KVOffload
from rtpllm.kvcache.block_hash import block_keys, namespace_key
from rtpllm.kvstore import HostTier, SSDTier, TieredKVStore, decode_into, encode_blocks
from rtpllm.kvstore.block_codec import block_payload_bytes, header_len
from rtpllm.loader.random_checkpoint import LLAMA_3_1_8B_SHAPE, TINY_SHAPE, make_config
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


# -- TTFT half: a prompt served from each tier vs recomputed, by the engine ---------------

TTFT_SHAPES: dict[str, dict[str, Any]] = {"llama8b": LLAMA_3_1_8B_SHAPE, "tiny": TINY_SHAPE}
ONE_TOKEN = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
ENGINE_TIER = {"host": "host", "ssd": "ssd", "ssd-warm": "ssd", "redis": "redis"}  # row -> KVOffload tier


def write_model_dir(shape: str, out: Path, max_len: int) -> Path:
    """A config.json of `shape` (Llama family, bf16) for `load_format="dummy"`."""
    cfg = make_config("llama", **TTFT_SHAPES[shape])
    cfg["torch_dtype"] = "bfloat16"
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], max_len)  # tiny's is 1024
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def kv_bytes_per_token(shape: str) -> int:
    cfg = TTFT_SHAPES[shape]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2  # K and V, bf16


class EngineTTFT:
    """An engine on random weights with host, SSD and Redis tiers below its KV pool, and
    the means to put one prompt's KV blocks in exactly one tier and time its first token.

    Nothing reaches a tier but what `place` puts there (no write-through, and the pool's
    prefix cache is emptied before every request, so nothing is evicted and demoted),
    and every prompt is new random tokens: each TTFT is the tier's, or recompute's.
    """

    def __init__(
        self,
        model_dir: Path,
        shape: str,
        device: str,
        prompt_tokens: int,
        ssd_dir: Path,
        redis_url: str | None,
        *,
        gb_per_s: dict[str, float] | None = None,
        drop_caches: bool = False,
        seed: int = 0,
    ) -> None:
        self.device = device
        self.prompt_tokens = prompt_tokens
        self.drop_caches = drop_caches
        self.cache_mode = "warm"
        # Each tier holds one prompt's blocks at a time (`forget` deletes them): room to
        # spare, so no tier ever evicts (and demotes) during a measurement.
        room = 3 * prompt_tokens * kv_bytes_per_token(shape)
        self.llm = LLM(
            str(model_dir),
            device=device,
            load_format="dummy",
            max_model_len=prompt_tokens + 64,
            max_num_seqs=4,
            max_num_batched_tokens=prompt_tokens + 256,  # the whole prompt in one prefill step
            offload=OffloadConfig(
                host_bytes=room,
                ssd_dir=str(ssd_dir),
                ssd_bytes=room,
                redis_url=redis_url,
                write_through=False,
                **{f"{tier}_gb_per_s": v for tier, v in (gb_per_s or {}).items()},
            ),
        )
        engine = self.llm.engine
        offload = engine.offload
        if offload is None or offload.store is None:
            raise RuntimeError("the engine has no in-process KV tiers")
        self.offload: KVOffload = offload
        self.store: TieredKVStore = offload.store
        self.bm = engine.block_manager
        self.block_size = self.bm.block_size
        self.vocab = engine.model_config.vocab_size
        self.rng = random.Random(seed)

    @property
    def hit_blocks(self) -> int:
        """Full blocks of a prompt a cache can serve (the last token is always computed)."""
        return (self.prompt_tokens - 1) // self.block_size

    def new_prompt(self) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(self.prompt_tokens)]

    def settle(self) -> None:
        """Finish any step still in flight and empty the pool's prefix cache."""
        engine = self.llm.engine
        while engine.has_unfinished_requests():
            engine.step()
        if not self.bm.reset_prefix_cache():
            raise RuntimeError("KV blocks still referenced after every request finished")

    def first_token(self, prompt: list[int]) -> tuple[float, int]:
        """Seconds to `prompt`'s first token, alone on the engine, and how many of its
        tokens came from a cache (pool or tier)."""
        self.settle()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        # The token is on the host when generate returns: no sync after (a step the
        # engine launched ahead is drained by the next settle, outside the timing).
        out = self.llm.generate([prompt], ONE_TOKEN)[0]
        return time.perf_counter() - start, out.num_cached_tokens

    def place(self, prompt: list[int], tier: str) -> list[bytes]:
        """Compute `prompt` once and put the KV of its servable full blocks in `tier`
        only (for "ssd", with their files' pages dropped from the page cache)."""
        self.llm.generate([prompt], ONE_TOKEN)
        keys = block_keys(prompt, self.block_size, self.bm.namespace)[: self.hit_blocks]
        block_ids = self.bm.cached_block_ids(keys)
        if len(block_ids) != len(keys):
            raise RuntimeError(f"{len(block_ids)} of the prompt's {len(keys)} blocks in the prefix cache")
        items = list(
            zip(keys, encode_blocks(self.llm.engine.kv_pool.kv, block_ids, self.offload.layout), strict=True)
        )
        if tier == "host":
            self.store.host.put_many(items)
        elif ENGINE_TIER[tier] == "ssd":
            assert self.store.ssd is not None
            self.store.ssd.put_many(items)
        else:
            assert self.store.redis is not None
            self.store.redis.put_many(items)
        found = self.store.lookup(keys)
        if found != [ENGINE_TIER[tier]] * len(keys):
            raise RuntimeError(f"{tier}: {found.count(ENGINE_TIER[tier])} of {len(keys)} blocks stored there")
        self.settle()
        if tier == "ssd":
            assert self.store.ssd is not None
            self.cache_mode = drop_file_cache([self.store.ssd.path(k) for k in keys], self.drop_caches)
        return keys

    def forget(self, keys: list[bytes]) -> None:
        """Delete blocks from every tier (a restore from SSD or Redis promoted them)."""
        for tier in (self.store.host, self.store.ssd, self.store.redis):
            if tier is not None:
                for key in keys:
                    tier.delete(key)

    def serve_from(self, tier: str, *, cost_model: bool) -> dict[str, Any]:
        """TTFT of a new prompt whose full blocks are in `tier` alone: restored whatever
        it costs (`cost_model=False`), or as the cost model decides."""
        prompt = self.new_prompt()
        keys = self.place(prompt, tier)
        restored = self.offload.stats.restored_blocks
        before = restored[ENGINE_TIER[tier]]
        self.offload.use_cost_model = cost_model
        try:
            seconds, cached = self.first_token(prompt)
        finally:
            self.offload.use_cost_model = True
        from_tier = restored[ENGINE_TIER[tier]] - before
        self.forget(keys)
        if not cost_model and (from_tier != len(keys) or cached != len(keys) * self.block_size):
            raise RuntimeError(f"{tier}: {from_tier} of {len(keys)} blocks restored, {cached} tokens cached")
        return {"seconds": seconds, "restored_blocks": from_tier, "cached_tokens": cached}

    def close(self) -> None:
        self.settle()
        self.llm.engine.close()


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def run_ttft(args: argparse.Namespace, tiers: list[str]) -> dict[str, Any]:
    """TTFT of a prompt served from each tier (restore forced) vs recomputed, and what
    the cost model chose per tier with its learned prefill speed."""
    work = Path(tempfile.mkdtemp(prefix="kv-tiers-ttft-", dir=args.ssd_dir))
    redis_proc: ManagedProcess | None = None
    bench: EngineTTFT | None = None
    try:
        redis_url = None
        if "redis" in tiers:
            redis_proc, redis_url = start_redis()
        print(f"TTFT: {args.ttft_shape} engine on {args.device} ...", file=sys.stderr, flush=True)
        model = write_model_dir(args.ttft_shape, work / "model", args.ttft_tokens + 64)
        bench = EngineTTFT(
            model,
            args.ttft_shape,
            args.device,
            args.ttft_tokens,
            work / "ssd",
            redis_url,
            gb_per_s=args.gb_per_s,
            drop_caches=args.drop_caches,
        )
        offload = bench.offload
        # Warm-up: kernels compiled for a whole-prompt prefill and for a short tail after
        # a restored prefix, the restore path's buffers made, the prefill speed learned.
        for _ in range(args.ttft_warmup):
            bench.first_token(bench.new_prompt())
        bench.serve_from("host", cost_model=False)
        recompute = []
        for _ in range(args.ttft_repeats):
            seconds, cached = bench.first_token(bench.new_prompt())
            if cached:
                raise RuntimeError(f"a new random prompt found {cached} tokens cached")
            recompute.append(seconds)
        recompute_ms = median_ms(recompute)
        rows: dict[str, Any] = {}
        for tier in tiers:
            print(f"  {tier} ...", file=sys.stderr, flush=True)
            forced = [bench.serve_from(tier, cost_model=False) for _ in range(args.ttft_repeats)]
            chosen = [bench.serve_from(tier, cost_model=True) for _ in range(args.ttft_repeats)]
            restore_ms = median_ms([r["seconds"] for r in forced])
            n_restored = [r["restored_blocks"] for r in chosen]
            decision = (
                "restore"
                if all(n == bench.hit_blocks for n in n_restored)
                else "recompute"
                if not any(n_restored)
                else "mixed"
            )
            chosen_ms = median_ms([r["seconds"] for r in chosen])
            faster = "restore" if restore_ms < recompute_ms else "recompute"
            # Within 10% either choice is as good as the other (and the medians of 3 move
            # by about that much).
            close = abs(restore_ms - recompute_ms) < 0.1 * min(restore_ms, recompute_ms)
            rows[tier] = {
                "restore_ms_median": restore_ms,
                "restore_ms_samples": [r["seconds"] * 1e3 for r in forced],
                "restore_gbps": bench.hit_blocks * offload.block_bytes / (restore_ms / 1e3) / 1e9,
                "configured_gb_per_s": offload.gb_per_s(ENGINE_TIER[tier]),
                "faster": faster,
                "cost_model": decision,
                "cost_model_ms_median": chosen_ms,
                "cost_model_ms_samples": [r["seconds"] * 1e3 for r in chosen],
                "cost_model_restored_blocks": n_restored,
                "right": "yes" if decision == faster else ("close" if close else "NO"),
                "page_cache": bench.cache_mode if tier == "ssd" else ("warm" if tier == "ssd-warm" else None),
            }
        rate = offload.prefill_rate
        return {
            "shape": args.ttft_shape,
            "prompt_tokens": args.ttft_tokens,
            "restored_blocks": bench.hit_blocks,
            "restored_bytes": bench.hit_blocks * offload.block_bytes,
            "block_bytes": offload.block_bytes,
            "repeats": args.ttft_repeats,
            "recompute_ms_median": recompute_ms,
            "recompute_ms_samples": [t * 1e3 for t in recompute],
            "prefill_tokens_per_s_learned": rate,
            "prefill_tokens_per_s_measured": args.ttft_tokens / (recompute_ms / 1e3),
            # The tier bandwidth above which the cost model restores.
            "breakeven_gb_per_s": offload.block_bytes * rate / bench.block_size / 1e9 if rate else None,
            "tiers": rows,
            "demoted_blocks": offload.stats.demoted_blocks,
            "store": bench.store.stats(),
        }
    finally:
        if bench is not None:
            bench.close()
        if redis_proc is not None:
            redis_proc.stop(5)
        shutil.rmtree(work, ignore_errors=True)


def run_restore(args: argparse.Namespace, tiers: list[str]) -> dict[str, Any]:
    """Restore throughput of each tier into a pool of `args.device` (the first half)."""
    shape = (
        SMOKE
        if args.smoke
        else KVShape(args.layers, args.kv_heads, args.head_dim, args.block_size, args.dtype)
    )
    layout = shape.layout(namespace_key("bench-kv-tiers", shape.dtype, shape.block_size))
    with_redis = "redis" in tiers
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
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, 2 repeats: a seconds-long check")
    ttft = ap.add_argument_group("TTFT half (the engine)")
    ttft.add_argument(
        "--ttft", action="store_true", help="also time a prompt's first token from each tier vs recompute"
    )
    ttft.add_argument(
        "--ttft-only", action="store_true", help="the TTFT half alone (no restore-throughput table)"
    )
    ttft.add_argument(
        "--ttft-shape",
        choices=sorted(TTFT_SHAPES),
        default=None,
        help="model (default: llama8b on CUDA, else tiny)",
    )
    ttft.add_argument(
        "--ttft-tokens", type=int, default=4096, help="prompt length (4096: 255 blocks restored)"
    )
    ttft.add_argument("--ttft-repeats", type=int, default=3)
    ttft.add_argument(
        "--ttft-warmup", type=int, default=3, help="whole prompts recomputed first (kernels, prefill speed)"
    )
    ttft.add_argument(
        "--gb-per-s",
        default="",
        help="the cost model's tier bandwidths, e.g. host=11,ssd=3.6 (default: OffloadConfig's)",
    )
    args = ap.parse_args(argv)
    args.tiers = [t for t in args.tiers.split(",") if t]
    unknown = set(args.tiers) - set(TIERS)
    if unknown:
        ap.error(f"unknown tiers: {sorted(unknown)}")
    if args.smoke:
        args.device, args.blocks, args.repeats, args.warmup = "cpu", 16, 2, 1
        args.ttft_shape, args.ttft_tokens, args.ttft_repeats, args.ttft_warmup = "tiny", 512, 2, 2
    args.ttft = args.ttft or args.ttft_only
    try:
        args.gb_per_s = {t: float(v) for t, v in (kv.split("=") for kv in args.gb_per_s.split(",") if kv)}
    except ValueError:
        ap.error(f"--gb-per-s: TIER=GB/s pairs, not {args.gb_per_s!r}")
    if set(args.gb_per_s) - {"host", "ssd", "redis"}:
        ap.error("--gb-per-s: tiers are host, ssd, redis")
    if args.ttft_shape is None:
        args.ttft_shape = "llama8b" if args.device.startswith("cuda") else "tiny"
    return args


def available_tiers(args: argparse.Namespace) -> list[str]:
    tiers = [t for t in args.tiers if t != "redis" or not args.no_redis]
    if "redis" in tiers:
        try:
            redis_server_binary()
        except FileNotFoundError as exc:
            print(f"redis skipped: {exc}", file=sys.stderr)
            tiers.remove("redis")
    return tiers


def release_device_memory() -> None:
    """Return the restore half's pools before the engine sizes its KV pool."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tiers = available_tiers(args)
    results = {} if args.ttft_only else run_restore(args, tiers)
    if args.ttft:
        release_device_memory()
        results["ttft"] = run_ttft(args, tiers)
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
    if not args.ttft_only:
        print_table(args, results, device_name)
    if args.ttft:
        print_ttft_table(args, results["ttft"], device_name)
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


def print_ttft_table(args: argparse.Namespace, res: dict[str, Any], device_name: str) -> None:
    rate, measured = res["prefill_tokens_per_s_learned"], res["prefill_tokens_per_s_measured"]
    breakeven = res["breakeven_gb_per_s"]
    print()
    print(
        f"TTFT of a {res['prompt_tokens']}-token prompt, {res['shape']} on {args.device} ({device_name}): "
        f"{res['restored_blocks']} blocks = {res['restored_bytes'] / 2**20:.1f} MiB of KV in the tier; "
        f"median of {res['repeats']}"
    )
    print(
        f"recompute {res['recompute_ms_median']:.1f} ms = {measured:,.0f} prompt tok/s; cost model's prefill speed "
        + (
            f"{rate:,.0f} tok/s: restores from a tier faster than {breakeven:.3g} GB/s"
            if rate
            else "not learned"
        )
    )
    print(
        f"{'tier':<10} {'restore ms':>10} {'GB/s':>7} {'recompute ms':>12} {'faster':>9} {'cfg GB/s':>8} "
        f"{'cost model':>10} {'its ms':>8} {'right':>5}"
    )
    for tier in TIERS:
        row = res["tiers"].get(tier)
        if row is None:
            continue
        print(
            f"{tier:<10} {row['restore_ms_median']:>10.1f} {row['restore_gbps']:>7.2f} "
            f"{res['recompute_ms_median']:>12.1f} {row['faster']:>9} {row['configured_gb_per_s']:>8.3g} "
            f"{row['cost_model']:>10} {row['cost_model_ms_median']:>8.1f} {row['right']:>5}"
        )


if __name__ == "__main__":
    main()
