"""The KV tiers below the pool with tensor parallelism, on the CPU (gloo, worker
processes): a TP=2 engine's tiers hold whole blocks (every KV head, read and written
through rank 0: `LLMEngine.kv_blocks()`), the bytes a TP=1 engine's tiers hold.

Per case (fp32; int8 KV, whose pages split values and scales by heads) one TP=1 and one
TP=2 engine, each with a host-memory tier and a pool of 24 blocks of 8 tokens, so a
64-token system prompt is evicted (demoted) by three other prompts and then restored:
- greedy tokens equal the TP=1 engine's, and every full block of the prompt comes back
  from the tier (64 cached tokens);
- the host tier's block for each of the prompt's keys, as the TP=1 engine stores it and
  as the TP=2 engine does: the same header but for the namespace (which names the TP size)
  and the same payload (fp32 within 1e-5 relative; int8 within one quantization step,
  scales within 1e-5);
- what the restore wrote into the TP=2 pool, read back through the view, is the tier's
  payload bit for bit.
And with the host's kvstore service (a real nats-server, the server in this process): a
TP=2 engine writes its blocks through to the kvstore (whole blocks again, equal to the
TP=1 engine's) and restores them from it once its pool has forgotten them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from rtpllm import LLM, SamplingParams
from rtpllm.config import OffloadConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.engine.sharded_blocks import ShardedPoolBlocks
from rtpllm.engine.tp_kv import ALL_LAYERS
from rtpllm.kvcache.block_hash import block_keys
from rtpllm.kvstore.block_codec import check_block
from rtpllm.kvstore.client import RemoteKVStore
from rtpllm.transfer import KVLayout
from tests.unit.test_kvstore_server_client import HOST, ServerThread, nats_url, wait_for  # noqa: F401
from tests.unit.test_tensor_parallel import live, one_thread_per_rank  # noqa: F401

pytestmark = pytest.mark.timeout(120)

ENGINE = {"device": "cpu", "block_size": 8, "num_blocks": 24, "max_num_batched_tokens": 128}
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SYSTEM = [(13 * i + 5) % 300 for i in range(64)] + [1, 2, 3]  # 8 full blocks of 8
OTHERS = [[(7 * i + j) % 300 for i in range(64)] for j in range(1, 4)]  # push SYSTEM out of the pool
CASES = {"fp32": "auto", "int8": "int8"}


class Pair:
    """A TP=1 and a TP=2 engine of one checkpoint and KV format, each with a host tier."""

    def __init__(self, model_dir: Path, kv_dtype: str) -> None:
        tiers = OffloadConfig(host_bytes=64 << 20)
        self.one = LLM(str(model_dir), kv_cache_dtype=kv_dtype, offload=tiers, **ENGINE)  # type: ignore[arg-type]
        self.two = LLM(str(model_dir), tensor_parallel_size=2, kv_cache_dtype=kv_dtype, offload=tiers, **ENGINE)  # type: ignore[arg-type]
        self.quantized = kv_dtype != "auto"

    def close(self) -> None:
        self.two.close()
        self.one.close()


@pytest.fixture(params=list(CASES))
def pair(request: pytest.FixtureRequest, tiny_llama: Path) -> Iterator[Pair]:
    pair = Pair(tiny_llama, CASES[request.param])
    yield pair
    pids = pair.two.engine.tp.workers.pids  # type: ignore[union-attr]
    pair.close()
    assert not live(pids)


def run(llm: LLM, prompt: list[int]) -> tuple[list[int], int]:
    out = llm.generate([prompt], PARAMS)[0]
    return out.outputs[0].token_ids, out.num_cached_tokens


def payloads(engine: LLMEngine, get: object) -> list[tuple[object, bytes]]:
    """(header, payload bytes) of the stored block of each of SYSTEM's full-block keys,
    fetched by `get(key)`."""
    out = []
    for key in block_keys(SYSTEM, engine.block_manager.block_size, engine.block_manager.namespace):
        data = get(key)  # type: ignore[operator]
        assert data is not None, "every full block of the prompt is in the tier"
        header = check_block(data)
        out.append((header, bytes(memoryview(data)[header.header_len :])))
    return out


def assert_same_kv(layout: KVLayout, head_dim: int | None, want: bytes, got: bytes) -> None:
    """Two whole blocks' payloads of `layout` hold the same KV: fp32 within 1e-5 relative;
    int8 (`head_dim` given: pages of [block_size, heads, head_dim] values, then
    [block_size, heads] fp32 scales) values within one step (rounding where the
    unquantized KV differs by ~1e-7), scales within 1e-5."""
    if head_dim is None:
        a, b = (torch.frombuffer(bytearray(x), dtype=torch.float32) for x in (want, got))
        err = ((b - a).abs().max() / a.abs().max()).item()
        assert err < 1e-5, f"relative error {err:.2e}"
        return
    cells = layout.block_size * layout.num_kv_heads
    a, b = (np.frombuffer(x, dtype=np.uint8).reshape(-1, cells * layout.head_dim) for x in (want, got))
    split = cells * head_dim
    step = np.abs(a[:, :split].view(np.int8).astype(int) - b[:, :split].view(np.int8).astype(int))
    assert step.max() <= 1 and (step > 0).mean() < 0.01, "values differ"
    sa, sb = a[:, split:].copy().view(np.float32), b[:, split:].copy().view(np.float32)
    assert (np.abs(sa - sb) <= 1e-5 * np.abs(sa)).all(), "scales differ"


def test_tp2_demotes_and_restores_whole_blocks_like_tp1(pair: Pair) -> None:
    results = []
    for llm in (pair.one, pair.two):
        assert run(llm, SYSTEM)[1] == 0
        for other in OTHERS:
            run(llm, other)
        offload = llm.engine.offload
        assert offload is not None and offload.stats.demoted_blocks >= 8
        results.append(run(llm, SYSTEM))
        assert offload.stats.restored_blocks["host"] == 8
    (want, cached_one), (got, cached_two) = results
    assert cached_one == cached_two == 64, "every full block of the prompt came back from the host tier"
    assert got == want, "TP=2 restored from its tier decodes TP=1's greedy tokens"

    one, two = pair.one.engine, pair.two.engine
    assert isinstance(two.kv_blocks(), ShardedPoolBlocks) and two.offload is not None and one.offload is not None
    assert two.offload.layout.num_kv_heads == one.offload.layout.num_kv_heads == two.model_config.num_kv_heads
    stored_one = payloads(one, one.offload.store.host.get)  # type: ignore[union-attr]
    stored_two = payloads(two, two.offload.store.host.get)  # type: ignore[union-attr]
    for (h1, p1), (h2, p2) in zip(stored_one, stored_two, strict=True):
        assert h1.layout.namespace != h2.layout.namespace, "the namespace names the TP size"
        assert (h2.layout.num_kv_heads, h2.payload_len) == (h1.layout.num_kv_heads, h1.payload_len), "whole blocks"
        assert_same_kv(h1.layout, two.model_config.head_dim if pair.quantized else None, p1, p2)

    # The restore wrote the tier's blocks into every rank's pool: read back, bit for bit.
    blocks = two.kv_blocks()
    keys = block_keys(SYSTEM, 8, two.block_manager.namespace)
    ids = two.block_manager.cached_block_ids(keys)
    assert len(ids) == 8
    back = blocks.host_buffer(blocks.block_bytes * len(ids))
    blocks.read_blocks(np.asarray(ids, dtype=np.int64), back)
    assert back.numpy().tobytes() == b"".join(p for _, p in stored_two)


def test_tp2_restores_from_the_kvstore_service(tiny_llama: Path, nats_url: str) -> None:  # noqa: F811
    # Its blocks reach its own host tier at once (write-through): the bytes to compare with.
    tiers = OffloadConfig(host_bytes=64 << 20, write_through=True)
    reference = LLM(str(tiny_llama), offload=tiers, **ENGINE)  # type: ignore[arg-type]
    want = run(reference, SYSTEM)[0]
    server = ServerThread(nats_url)
    # The first request teaches the engine that recomputing 64 tokens takes milliseconds
    # here: a request may still wait for its tiers up to 5 s (a loaded VM).
    config = OffloadConfig(
        kvstore_host_id=HOST, kvstore_nats_url=nats_url, kvstore_wait_s=5.0, tier_wait_min_s=5.0, tier_wait_max_s=5.0
    )
    llm = LLM(str(tiny_llama), tensor_parallel_size=2, offload=config, **ENGINE)  # type: ignore[arg-type]
    try:
        offload = llm.engine.offload
        assert offload is not None and isinstance(offload.tiers, RemoteKVStore) and offload.write_through
        assert run(llm, SYSTEM) == (want, 0)
        wait_for(lambda: len(server.store.host) >= 8)  # written through, in the background
        assert offload.tiers.flush()
        engine, ref = llm.engine, reference.engine
        assert ref.offload is not None and ref.offload.store is not None
        stored = payloads(engine, server.store.host.get)
        for (h1, p1), (h2, p2) in zip(payloads(ref, ref.offload.store.host.get), stored, strict=True):
            assert h2.layout.num_kv_heads == h1.layout.num_kv_heads == engine.model_config.num_kv_heads
            assert_same_kv(h1.layout, None, p1, p2)
        # The pool forgets the prompt; the kvstore still has it.
        assert engine.block_manager.reset_prefix_cache()
        assert run(llm, SYSTEM) == (want, 64), "every full block came back from the kvstore"
        assert offload.stats.restored_blocks["host"] == 8
        assert engine.stats().tier_hit_tokens["host"] == 64
    finally:
        llm.close()
        server.stop()


def test_a_rank_failing_its_part_drops_the_store_or_misses_the_restore(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank that cannot read or write its heads of a tier's blocks (it reports so; the
    group stays in step): that store is dropped, that restore is a miss and recomputed,
    with the same tokens; the next ones work again."""
    want = run(LLM(str(tiny_llama), **ENGINE), SYSTEM)[0]  # type: ignore[arg-type]
    llm = LLM(str(tiny_llama), tensor_parallel_size=2, offload=OffloadConfig(host_bytes=64 << 20), **ENGINE)  # type: ignore[arg-type]
    try:
        engine, offload = llm.engine, llm.engine.offload
        assert offload is not None and offload.store is not None
        channel = engine.tp.kv  # type: ignore[union-attr]
        read, write = channel.read, channel.write

        def evict_and_rerun() -> tuple[list[int], int]:
            for other in OTHERS:
                run(llm, other)
            return run(llm, SYSTEM)

        def failing_read(layer: int, *args: object) -> tuple[list[torch.Tensor], list[int]]:
            slices, failed = read(layer, *args)  # type: ignore[arg-type]
            return slices, [*failed, 1] if layer == ALL_LAYERS else failed

        monkeypatch.setattr(channel, "read", failing_read)
        assert run(llm, SYSTEM) == (want, 0)
        assert evict_and_rerun() == (want, 0), "no store reached the host tier: computed again"
        assert len(offload.store.host) == 0 and offload.stats.demoted_blocks >= 8

        monkeypatch.setattr(channel, "read", read)
        monkeypatch.setattr(channel, "write", lambda layer, *args: [*write(layer, *args), 1] if layer == ALL_LAYERS else write(layer, *args))
        assert evict_and_rerun() == (want, 0), "the restore failed on rank 1: a miss, recomputed"
        assert offload.stats.failed_restores >= 8 and len(offload.store.host) >= 8

        monkeypatch.setattr(channel, "write", write)
        assert evict_and_rerun() == (want, 64), "restored again once the rank does its part"
        engine.block_manager.check_invariants(set())
    finally:
        llm.close()
