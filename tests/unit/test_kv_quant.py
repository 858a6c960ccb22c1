"""KV-cache quantization on the CPU path (docs/kv_quantization.md): the quantize /
dequantize math, the pool's page layout (values and scales of a block together), the
per-layer spec and plan, block-key namespaces, the torch attention backend on quantized
KV, and an engine with fp8/int8 KV: capacity in bytes, tiers moving quantized blocks
(uniform and mixed per-layer plans) exactly, and refusals where a format cannot go."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rtpllm import LLM, SamplingParams
from rtpllm.attention.backend import AttentionMetadata
from rtpllm.attention.torch_ref import TorchReferenceBackend
from rtpllm.config import CacheConfig, OffloadConfig
from rtpllm.kernels.attention_ref import gather_context, reference_attention
from rtpllm.kernels.kv_cache import store_kv_ref
from rtpllm.kernels.kv_quant import dequantize_ref, quantize_ref
from rtpllm.kvcache.block_hash import block_keys, namespace_key
from rtpllm.kvcache.kv_format import KVCacheSpec, quantized_views
from rtpllm.kvcache.kv_plan import KVCachePlan, cache_spec, load_plan
from rtpllm.kvcache.kv_pool import KVPool, bytes_per_block
from rtpllm.kvstore.block_codec import decode_into, encode_blocks
from rtpllm.models.config import ModelConfig
from rtpllm.transfer.layout import KVLayout

FORMATS = ["fp8", "int8"]


# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_round_trip_error_bounds(fmt: str) -> None:
    gen = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes: per-row scales must follow each.
    x = torch.randn(64, 8, 128, generator=gen) * torch.logspace(-3, 3, 64).view(64, 1, 1)
    values, scales = quantize_ref(x, fmt)
    assert values.dtype == (torch.float8_e4m3fn if fmt == "fp8" else torch.int8)
    assert scales.shape == (64, 8) and scales.dtype == torch.float32
    back = dequantize_ref(values, scales)
    err = (back - x).abs()
    amax = x.abs().amax(-1, keepdim=True)
    if fmt == "int8":
        # Half a step of amax / 127 (plus fp32 rounding of the scale).
        assert (err <= amax / 127 * 0.5 * 1.0001).all()
    else:
        # e4m3: 3 mantissa bits -> relative half-step 2^-4 for normal values; values
        # below amax / 2^8 fall into e4m3's subnormals, absolute step amax / 448 * 2^-9.
        assert (err <= torch.maximum(x.abs() * 2**-4, amax / 448 * 2**-9) * 1.0001).all()
    rel = ((back - x).norm() / x.norm()).item()
    # Gaussian rows: int8 rms error = step / sqrt(12) with step = amax / 127 ~ 2.8 sigma / 127.
    assert rel < (0.03 if fmt == "fp8" else 0.008), rel


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_edge_rows(fmt: str) -> None:
    x = torch.zeros(3, 2, 16)
    x[1, 0, 3] = -5.0  # a single spike: it becomes exactly +-qmax * scale
    x[2] = 1e30  # huge but finite
    values, scales = quantize_ref(x, fmt)
    back = dequantize_ref(values, scales)
    assert torch.isfinite(back).all() and torch.isfinite(scales).all()
    assert torch.equal(back[0], torch.zeros(2, 16)), "zero rows stay zero"
    assert back[1, 0, 3].item() == pytest.approx(-5.0, rel=1e-6)
    assert torch.allclose(back[2], x[2], rtol=1e-6)


# ----------------------------------------------------------------------------- layout


def _model(layers: int = 3, heads: int = 2, head_dim: int = 64) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM", family="llama", hidden_size=heads * head_dim * 2, num_layers=layers,
        num_heads=heads * 2, num_kv_heads=heads, head_dim=head_dim, intermediate_size=64, vocab_size=100,
        max_position_embeddings=512, rms_norm_eps=1e-6,
    )


def test_pool_page_holds_values_then_scales_of_its_block() -> None:
    cfg = _model()
    pool = KVPool(cfg, num_blocks=5, block_size=16, dtype=torch.bfloat16, device="cpu",
                  spec=KVCacheSpec.resolve(3, torch.bfloat16, "fp8"))
    assert pool.kv is not None and pool.kv.dtype == torch.uint8
    assert tuple(pool.kv.shape) == (3, 2, 6, 16, 2, 68)
    k, v, ks, vs = pool.layer_caches()[1]
    assert k.dtype == torch.float8_e4m3fn and ks.dtype == torch.float32
    assert tuple(k.shape) == (6, 16, 2, 64) and tuple(ks.shape) == (6, 16, 2)
    x = torch.randn(2, 2, 64)
    store_kv_ref(x, x, k, v, torch.tensor([3 * 16 + 5, 4 * 16]), ks, vs)
    # Only blocks 3 and 4 of layer 1 changed, K and V pages, values and scales alike.
    changed = (pool.kv != 0).flatten(3).any(-1).nonzero().tolist()
    assert changed == [[1, 0, 3], [1, 0, 4], [1, 1, 3], [1, 1, 4]]
    page = pool.kv[1, 0, 3].flatten()
    assert page[: 16 * 2 * 64].view(torch.float8_e4m3fn).view(16, 2, 64)[5].float().abs().sum() > 0
    scales = page[16 * 2 * 64 :].view(torch.float32).view(16, 2)
    assert torch.equal(scales[5], ks[3, 5]) and (scales[5] > 0).all() and scales[4].eq(0).all()


def test_pool_bytes_and_capacity() -> None:
    cfg = _model(head_dim=128)
    bf16 = bytes_per_block(cfg, 16, torch.bfloat16)
    fp8 = bytes_per_block(cfg, 16, torch.bfloat16, spec=KVCacheSpec.resolve(3, torch.bfloat16, "fp8"))
    assert bf16 == 2 * 3 * 16 * 2 * 128 * 2
    assert fp8 == 2 * 3 * 16 * 2 * (128 + 4)
    assert bf16 / fp8 == pytest.approx(256 / 132)  # 1.94x the tokens at head_dim 128
    # The default spec is exactly the pool before quantization.
    pool = KVPool(cfg, 4, 16, torch.float32, "cpu")
    assert pool.kv is not None and pool.kv.dtype == torch.float32 and tuple(pool.kv.shape) == (3, 2, 5, 16, 2, 128)
    assert all(len(c) == 2 for c in pool.layer_caches())


def test_mixed_plan_pool_has_per_layer_formats() -> None:
    cfg = _model()
    spec = KVCacheSpec.resolve(3, torch.float32, plan=["fp8", "auto", "int8"])
    assert spec.formats == ("fp8", "float32", "int8") and spec.uniform_format is None
    pool = KVPool(cfg, 4, 16, torch.float32, "cpu", spec=spec)
    caches = pool.layer_caches()
    assert [c[0].dtype for c in caches] == [torch.float8_e4m3fn, torch.float32, torch.int8]
    assert [len(c) for c in caches] == [4, 2, 4]
    assert pool.nbytes >= spec.bytes_per_block(16, 2, 64) * 5
    # Layers do not overlap: writing one layer leaves the others zero.
    caches[1][0].fill_(1.0)
    assert caches[0][0].float().abs().sum() == 0 and caches[2][2].abs().sum() == 0
    # The block movers' pages are the caches' memory: K then V, every block, per layer.
    pages = pool.layer_pages()
    assert [tuple(p.shape) for p in pages] == [(2, 5, 16, 2, 68), (2, 5, 16, 2, 64), (2, 5, 16, 2, 68)]
    assert pages[1][0].data_ptr() == caches[1][0].data_ptr() and pages[1][1].data_ptr() == caches[1][1].data_ptr()
    assert pages[2][1].data_ptr() == caches[2][1].data_ptr()
    assert all(pool.buffer is not None and p.untyped_storage().data_ptr() == pool.buffer.data_ptr() for p in pages)
    assert pool.kv is None
    with pytest.raises(ValueError, match="one KV format for every layer"):
        pool.require_uniform("tensor parallelism")


def test_spec_from_options_and_plan_file(tmp_path: Path) -> None:
    def spec_of(cache: CacheConfig, num_layers: int) -> KVCacheSpec:
        return cache_spec(cache, num_layers, torch.bfloat16, load_plan(cache))

    assert spec_of(CacheConfig(), 4).formats == ("bfloat16",) * 4
    spec = spec_of(CacheConfig(kv_cache_dtype="int8", kv_cache_dtype_skip_layers=(0, 3)), 4)
    assert spec.formats == ("bfloat16", "int8", "int8", "bfloat16")
    plan = KVCachePlan(("fp8", "fp8", "auto", "int8"), model="m", threshold=0.01, errors={"fp8": [0.1] * 4})
    plan.save(tmp_path / "plan.json")
    assert KVCachePlan.load(tmp_path / "plan.json") == plan
    spec = spec_of(CacheConfig(kv_cache_plan=str(tmp_path / "plan.json"), kv_cache_dtype_skip_layers=(0,)), 4)
    assert spec.formats == ("bfloat16", "fp8", "bfloat16", "int8")
    with pytest.raises(ValueError, match="plan has 4 layers, the model 5"):
        spec_of(CacheConfig(kv_cache_plan=str(tmp_path / "plan.json")), 5)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        CacheConfig(kv_cache_dtype="fp4")
    with pytest.raises(ValueError, match="layer 9 is not in"):
        spec_of(CacheConfig(kv_cache_dtype="fp8", kv_cache_dtype_skip_layers=(9,)), 4)


def test_namespace_names_the_format() -> None:
    dt = torch.bfloat16
    auto = KVCacheSpec.resolve(4, dt).namespace_format(dt)
    assert auto == "model", "the default keeps the block keys engines had before quantization"
    formats = {
        name: KVCacheSpec.resolve(4, dt, name).namespace_format(dt) for name in ("fp8", "int8")
    } | {"mixed": KVCacheSpec.resolve(4, dt, "fp8", skip_layers=(0,)).namespace_format(dt)}
    # bf16 KV under a bf16 model is the model's dtype: same blocks, same keys.
    assert KVCacheSpec.resolve(4, dt, "bf16").namespace_format(dt) == "model"
    assert KVCacheSpec.resolve(4, torch.float32, "bf16").namespace_format(torch.float32) != "model"
    # Two mixed plans of the same formats in other layers are other blocks too.
    other_plan = KVCacheSpec.resolve(4, dt, "fp8", skip_layers=(1,)).namespace_format(dt)
    assert other_plan != formats["mixed"]
    keys = {namespace_key("w", "bfloat16", 16, f) for f in [auto, *formats.values(), other_plan]}
    assert len(keys) == 5
    assert namespace_key("w", "bfloat16", 16) == namespace_key("w", "bfloat16", 16, auto)


def test_layout_mismatch_says_what_differs() -> None:
    cfg = _model()
    a = KVPool(cfg, 2, 16, torch.bfloat16, "cpu", spec=KVCacheSpec.resolve(3, torch.bfloat16, "fp8"))
    b = KVPool(cfg, 2, 16, torch.bfloat16, "cpu", spec=KVCacheSpec.resolve(3, torch.bfloat16, "int8"))
    la = KVLayout.of(a.require_uniform("t"), namespace_key("w", "bfloat16", 16, "fp8;scales=f32-token-head"))
    lb = KVLayout.of(b.require_uniform("t"), namespace_key("w", "bfloat16", 16, "int8;scales=f32-token-head"))
    diff = la.mismatch(lb)
    assert diff is not None and "--kv-cache-dtype" in diff


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_blocks_round_trip_through_the_tier_codec(fmt: str) -> None:
    cfg = _model()
    spec = KVCacheSpec.resolve(3, torch.bfloat16, fmt)
    src = KVPool(cfg, 6, 16, torch.bfloat16, "cpu", spec=spec)
    for k, v, ks, vs in src.layer_caches():
        x = torch.randn(40, 2, 64)
        store_kv_ref(x, x * 2, k, v, torch.arange(40) + 16, ks, vs)
    kv = src.require_uniform("t")
    layout = KVLayout.of(kv, b"ns")
    payloads = encode_blocks(kv, [1, 2, 3], layout)
    dst = KVPool(cfg, 6, 16, torch.bfloat16, "cpu", spec=spec)
    decode_into(dst.require_uniform("t"), [4, 0, 5], payloads, layout)
    for (k1, _, ks1, _), (k2, _, ks2, _) in zip(src.layer_caches(), dst.layer_caches(), strict=True):
        assert torch.equal(k1[1:4].view(torch.uint8), k2[[4, 0, 5]].view(torch.uint8))
        assert torch.equal(ks1[1:4], ks2[[4, 0, 5]])


# ----------------------------------------------------------------------------- attention


def _meta(seq_lens: list[int], q_lens: list[int], tables: torch.Tensor, block_size: int) -> AttentionMetadata:
    qsl, slots = [0], []
    for i, (s, q) in enumerate(zip(seq_lens, q_lens, strict=True)):
        qsl.append(qsl[-1] + q)
        slots += [int(tables[i, p // block_size]) * block_size + p % block_size for p in range(s - q, s)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables, num_decodes=0,
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), block_size=block_size,
        query_start_loc_host=qsl, seq_lens_host=list(seq_lens),
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (6, 1)])
def test_torch_backend_attends_to_the_dequantized_cache(fmt: str, heads: int, kv_heads: int) -> None:
    """The CPU engine's backend on a quantized pool: K/V quantized as stored, attention
    over exactly the dequantized contents, and chunking does not change the result."""
    gen = torch.Generator().manual_seed(1)
    bs, dim, total = 16, 32, 45
    pages = torch.zeros(8, 2, bs, kv_heads, dim + 4, dtype=torch.uint8)
    k_cache, k_scale = quantized_views(pages[:, 0], fmt, bs, kv_heads, dim)
    v_cache, v_scale = quantized_views(pages[:, 1], fmt, bs, kv_heads, dim)
    table = torch.tensor([[6, 2, 5]], dtype=torch.int32)
    q = torch.randn(total, heads, dim, generator=gen)
    k = torch.randn(total, kv_heads, dim, generator=gen) * 3
    v = torch.randn(total, kv_heads, dim, generator=gen)
    backend = TorchReferenceBackend()
    whole = backend.forward(q, k, v, k_cache, v_cache, _meta([total], [total], table, bs), dim**-0.5, None, k_scale, v_scale)
    k_ctx = gather_context(k_cache, table[0], total, k_scale)
    v_ctx = gather_context(v_cache, table[0], total, v_scale)
    assert torch.equal(k_ctx, dequantize_ref(*quantize_ref(k, fmt)))
    torch.testing.assert_close(whole, reference_attention(q, k_ctx, v_ctx, dim**-0.5), rtol=0, atol=0)
    # The same prompt in two chunks over a fresh pool: identical outputs.
    pages.zero_()
    first = backend.forward(q[:20], k[:20], v[:20], k_cache, v_cache, _meta([20], [20], table, bs), dim**-0.5, None, k_scale, v_scale)
    second = backend.forward(q[20:], k[20:], v[20:], k_cache, v_cache, _meta([total], [25], table, bs), dim**-0.5, None, k_scale, v_scale)
    assert torch.equal(torch.cat([first, second]), whole)


# ----------------------------------------------------------------------------- engine


PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[(13 * i + 5 * j) % 300 for i in range(40)] for j in range(1, 4)]


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]


def test_engine_pool_sized_in_bytes_and_reports_real_blocks(tiny_llama: Path) -> None:
    counts = {}
    for fmt in ("auto", "fp8", "int8"):
        llm = LLM(str(tiny_llama), device="cpu", dtype="bfloat16", cpu_kv_bytes=4 << 20, kv_cache_dtype=fmt)
        engine = llm.engine
        counts[fmt] = engine.kv_pool.num_blocks
        assert engine.stats().num_blocks == engine.block_manager.num_blocks == counts[fmt]
        assert _generate(llm, PROMPTS[:1])[0], "generates with quantized KV"
    head_dim = ModelConfig.from_dir(tiny_llama).head_dim
    expected = 2 * head_dim / (head_dim + 4)
    assert counts["fp8"] == counts["int8"]
    assert counts["fp8"] / counts["auto"] == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_quantized_prefix_cache_and_chunking_are_exact(tiny_llama: Path, fmt: str) -> None:
    """Cached quantized blocks give the tokens recomputing them gives: prefix hits and
    chunked prefill read the KV the store wrote, and attend to new tokens as stored."""
    fresh = LLM(str(tiny_llama), device="cpu", num_blocks=64, kv_cache_dtype=fmt, enable_prefix_caching=False)
    expected = _generate(fresh, PROMPTS)
    cached = LLM(str(tiny_llama), device="cpu", num_blocks=64, kv_cache_dtype=fmt, max_num_batched_tokens=16)
    assert _generate(cached, PROMPTS) == expected
    again = cached.generate(PROMPTS, PARAMS)
    assert [o.outputs[0].token_ids for o in again] == expected
    assert all(o.num_cached_tokens > 0 for o in again)


def test_engine_kv_tiers_restore_quantized_blocks_exactly(tiny_llama: Path) -> None:
    system = [(13 * i + 5) % 300 for i in range(64)]
    others = [[(7 * i + j) % 300 for i in range(64)] for j in range(1, 4)]

    def make(**offload: object) -> LLM:
        return LLM(str(tiny_llama), device="cpu", block_size=8, num_blocks=24, max_num_batched_tokens=128,
                   kv_cache_dtype="int8", offload=OffloadConfig(**offload) if offload else None)  # type: ignore[arg-type]

    reference = _generate(make(), [system + [1, 2, 3]])[0]
    llm = make(host_bytes=64 << 20)
    assert _generate(llm, [system + [1, 2, 3]])[0] == reference
    for other in others:
        _generate(llm, [other])
    out = llm.generate([system + [1, 2, 3]], PARAMS)[0]
    assert out.outputs[0].token_ids == reference
    assert out.num_cached_tokens == 64
    assert llm.engine.offload is not None and llm.engine.offload.stats.restored_blocks["host"] >= 1


def _mixed_plan(tmp_path: Path, kind: str) -> dict[str, object]:
    """Engine options of a mixed per-layer plan on the 2-layer tiny model: layer 0 kept
    in the model's dtype (skip layers), or fp8 and int8 layers (a plan file)."""
    if kind == "skip":
        return {"kv_cache_dtype": "int8", "kv_cache_dtype_skip_layers": (0,)}
    KVCachePlan(("fp8", "int8"), model="m", threshold=0.1, errors={}).save(tmp_path / "plan.json")
    return {"kv_cache_plan": str(tmp_path / "plan.json")}


@pytest.mark.parametrize("kind", ["skip", "plan"])
def test_engine_kv_tiers_restore_mixed_plan_blocks_exactly(tiny_llama: Path, tmp_path: Path, kind: str) -> None:
    """A mixed per-layer pool demotes evicted blocks to the host tier and restores them:
    the same bytes in every layer's pages, the same greedy tokens as without the tier."""
    system = [(13 * i + 5) % 300 for i in range(64)]
    others = [[(7 * i + j) % 300 for i in range(64)] for j in range(1, 4)]
    plan = _mixed_plan(tmp_path, kind)

    def make(**offload: object) -> LLM:
        return LLM(str(tiny_llama), device="cpu", block_size=8, num_blocks=24, max_num_batched_tokens=128,
                   offload=OffloadConfig(**offload) if offload else None, **plan)  # type: ignore[arg-type]

    reference = _generate(make(), [system + [1, 2, 3]])[0]
    llm = make(host_bytes=64 << 20)
    engine = llm.engine
    assert engine.kv_pool.kv is None and engine.kv_pool.spec.uniform_format is None
    assert _generate(llm, [system + [1, 2, 3]])[0] == reference
    keys = block_keys(system, 8, engine.block_manager.namespace)
    blocks = engine.kv_blocks()
    assert blocks.layout.layer_formats == engine.kv_pool.spec.formats

    def stored(ids: list[int]) -> torch.Tensor:
        out = blocks.host_buffer(len(ids) * blocks.block_bytes)
        blocks.read_blocks(np.asarray(ids), out)
        return out.clone()

    before = stored(engine.block_manager.cached_block_ids(keys))
    for other in others:  # push the system prompt out of the pool
        _generate(llm, [other])
    assert len(engine.block_manager.cached_block_ids(keys)) < 8
    out = llm.generate([system + [1, 2, 3]], PARAMS)[0]
    assert out.outputs[0].token_ids == reference
    assert out.num_cached_tokens == 64, "every full block restored, none recomputed"
    assert engine.offload is not None and engine.offload.stats.restored_blocks["host"] >= 1
    assert torch.equal(stored(engine.block_manager.cached_block_ids(keys)), before)


@pytest.mark.timeout(60)
def test_tensor_parallel_still_refuses_to_move_a_mixed_plan(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="with tensor parallelism needs one KV format for every layer"):
        LLM(str(tiny_llama), device="cpu", num_blocks=16, tensor_parallel_size=2, kv_cache_dtype="fp8",
            kv_cache_dtype_skip_layers=(0,), offload=OffloadConfig(host_bytes=1 << 20))


# ----------------------------------------------------------------------------- PD data plane


def _filled_pool(fmt: str, seed: int) -> KVPool:
    pool = KVPool(_model(), 8, 16, torch.bfloat16, "cpu", spec=KVCacheSpec.resolve(3, torch.bfloat16, fmt))
    gen = torch.Generator().manual_seed(seed)
    for k, v, ks, vs in pool.layer_caches():
        x = torch.randn(9 * 16, 2, 64, generator=gen)
        store_kv_ref(x, -x, k, v, torch.arange(9 * 16), ks, vs)
    return pool


@pytest.mark.timeout(30)
async def test_quantized_blocks_cross_the_data_plane_with_their_scales() -> None:
    from rtpllm.transfer import KVReceiver, KVSender

    ns = namespace_key("w", "bfloat16", 16, "fp8;scales=f32-token-head")
    src, dst = _filled_pool("fp8", 0), _filled_pool("fp8", 1)
    src_kv, dst_kv = src.require_uniform("t"), dst.require_uniform("t")
    before = dst_kv.clone()
    receiver = KVReceiver(dst_kv, KVLayout.of(dst_kv, ns), backends=["tcp"])
    await receiver.start()
    sender = KVSender(src_kv, KVLayout.of(src_kv, ns), prefer=["tcp"])
    try:
        incoming = receiver.expect("t", [5, 0, 7], lease_s=10)
        out = await sender.open(receiver.endpoint, "t", 3, timeout_s=10, token=incoming.token)
        await out.send([1, 2, 3], 0)
        sent = await out.finish()
        await incoming.wait()
    finally:
        await sender.close()
        await receiver.close()
    # A quantized block is (D + 4) / (2 D) of a bf16 one on the wire.
    assert sent.nbytes == 3 * 3 * 2 * 16 * 2 * 68
    assert torch.equal(dst_kv[:, :, [5, 0, 7]], src_kv[:, :, [1, 2, 3]])
    assert torch.equal(dst_kv[:, :, [1, 2, 3, 4, 6, 8]], before[:, :, [1, 2, 3, 4, 6, 8]])
    for (k1, v1, ks1, vs1), (k2, v2, ks2, vs2) in zip(src.layer_caches(), dst.layer_caches(), strict=True):
        assert torch.equal(dequantize_ref(k1[1:4], ks1[1:4]), dequantize_ref(k2[[5, 0, 7]], ks2[[5, 0, 7]]))
        assert torch.equal(dequantize_ref(v1[1:4], vs1[1:4]), dequantize_ref(v2[[5, 0, 7]], vs2[[5, 0, 7]]))


@pytest.mark.timeout(30)
async def test_decode_refuses_kv_of_another_format() -> None:
    from rtpllm.transfer import KVReceiver, KVSender, TransferRefused

    src, dst = _filled_pool("int8", 0), _filled_pool("fp8", 1)
    src_kv, dst_kv = src.require_uniform("t"), dst.require_uniform("t")
    receiver = KVReceiver(dst_kv, KVLayout.of(dst_kv, namespace_key("w", "bfloat16", 16, "fp8;scales=f32-token-head")), backends=["tcp"])
    await receiver.start()
    sender = KVSender(src_kv, KVLayout.of(src_kv, namespace_key("w", "bfloat16", 16, "int8;scales=f32-token-head")), prefer=["tcp"])
    try:
        incoming = receiver.expect("t", [0], lease_s=10)
        with pytest.raises(TransferRefused, match="--kv-cache-dtype"):
            await sender.open(receiver.endpoint, "t", 1, timeout_s=10, token=incoming.token)
    finally:
        await sender.close()
        await receiver.close()


async def test_decode_side_never_uses_a_prefill_of_another_kv_format(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from rtpllm.protocol.messages import Heartbeat, encode
    from rtpllm.serving.disagg_decode import DecodeConfig, DecodeSide

    ours, theirs = b"fp8-namespace", b"int8-namespace"
    receiver = SimpleNamespace(layout=SimpleNamespace(namespace=ours))
    side = DecodeSide(None, None, "decode-0", "m", receiver, DecodeConfig())  # type: ignore[arg-type]

    def beat(instance: str, namespace: bytes) -> SimpleNamespace:
        hb = Heartbeat(instance_id=instance, role="prefill", model="m", max_model_len=64, max_num_seqs=4,
                       block_size=16, kv_namespace=namespace, lease_s=3.0, seq=1)
        return SimpleNamespace(data=encode(hb))

    await side._on_heartbeat(beat("p-same", ours))
    with caplog.at_level("ERROR"):
        await side._on_heartbeat(beat("p-other", theirs))
        await side._on_heartbeat(beat("p-other", theirs))
    assert [i.instance_id for i in side.prefill_instances()] == ["p-same"]
    refusals = [r for r in caplog.records if "p-other" in r.getMessage()]
    assert len(refusals) == 1 and "--kv-cache-dtype" in refusals[0].getMessage()


# ----------------------------------------------------------------------------- calibration


def test_choose_plan_keeps_outlier_layers_unquantized() -> None:
    from rtpllm.engine.kv_calibrate import choose_plan

    errors = {"fp8": [0.05, 0.04, 0.30, 0.05, 0.06, 0.05, 0.05, 0.9], "int8": [0.02, 0.05, 0.25, 0.02, 0.01, 0.02, 0.03, 0.8]}
    layers, threshold = choose_plan(errors)
    assert threshold == pytest.approx(3 * 0.025)
    assert layers == ["int8", "fp8", "auto", "int8", "int8", "int8", "int8", "auto"]
    # At most a quarter of the layers stay unquantized, the worst first.
    layers, _ = choose_plan(errors, threshold=0.0, max_skip_fraction=0.25)
    assert layers.count("auto") == 2 and layers[7] == "auto" and layers[2] == "auto"


def test_calibration_measures_every_layer_and_its_plan_serves(tiny_llama: Path, tmp_path: Path) -> None:
    from rtpllm.engine.kv_calibrate import choose_plan, measure

    prompts = [[(11 * i + 7 * j) % 300 for i in range(50)] for j in range(3)]
    found = measure(str(tiny_llama), prompts)
    errors = found.errors
    layers = ModelConfig.from_dir(tiny_llama).num_layers
    assert found.tokens == 150 and found.identity
    assert set(errors) == {"fp8", "int8"} and all(len(e) == layers for e in errors.values())
    assert all(0 < x < 0.5 for e in errors.values() for x in e), errors
    # Gaussian-like K/V of random weights: int8's uniform step beats e4m3's 3 mantissa bits.
    assert all(i < f for i, f in zip(errors["int8"], errors["fp8"], strict=True))
    # int8's error is its best K smoothing's (tests/unit/test_k_smoothing.py), never above unsmoothed.
    assert all(e <= u for e, u in zip(errors["int8"], found.candidates["int8~0"], strict=True))
    plan, threshold = choose_plan(errors, threshold=errors["int8"][0] * 0.999)
    found.plan(plan, threshold).save(tmp_path / "p.json")
    llm = LLM(str(tiny_llama), device="cpu", num_blocks=32, kv_cache_plan=str(tmp_path / "p.json"))
    assert llm.engine.kv_pool.spec.formats == tuple("float32" if f == "auto" else f for f in plan)
    assert _generate(llm, prompts[:1])[0]


# ----------------------------------------------------------------------------- CLI


def test_cli_flags_reach_the_cache_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from rtpllm.cli import build_parser
    from rtpllm.cli.serve import worker_settings

    default = worker_settings(build_parser().parse_args(["serve", "worker", "--device", "cpu"])).engine.cache
    assert (default.kv_cache_dtype, default.kv_cache_plan, default.kv_cache_dtype_skip_layers) == ("auto", None, ())
    args = ["serve", "worker", "--device", "cpu", "--kv-cache-dtype", "int8", "--kv-cache-dtype-skip-layers", "0, 29"]
    cache = worker_settings(build_parser().parse_args(args)).engine.cache
    assert (cache.kv_cache_dtype, cache.kv_cache_dtype_skip_layers) == ("int8", (0, 29))
    monkeypatch.setenv("RTPLLM_KV_CACHE_DTYPE", "fp8")
    monkeypatch.setenv("RTPLLM_KV_CACHE_PLAN", "/plans/p.json")
    cache = worker_settings(build_parser().parse_args(["serve", "worker", "--device", "cpu"])).engine.cache
    assert (cache.kv_cache_dtype, cache.kv_cache_plan) == ("fp8", "/plans/p.json")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "worker", "--kv-cache-dtype", "fp4"])
    with pytest.raises(SystemExit, match="skip-layers"):
        worker_settings(build_parser().parse_args(["serve", "worker", "--device", "cpu", "--kv-cache-dtype-skip-layers", "a"]))
