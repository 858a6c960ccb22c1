"""Per-channel K smoothing (rtpllm.models.k_smoothing, docs/kv_quantization.md): the
vectors, their fold into the q/k weights (the model computes what it computed before),
the calibration finding them where K has outlier channels, int8 KV getting closer to
the unquantized model with them, and clear refusals of vectors that cannot be exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rtpllm import LLM, SamplingParams
from rtpllm.kvcache.kv_plan import KVCachePlan
from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.models.config import ModelConfig
from rtpllm.models.k_smoothing import smoothing_vectors
from tests.conftest import FAMILIES
from tests.unit.test_tensor_parallel import Pair, Recorder

ENGINE = {"device": "cpu", "num_blocks": 32, "enable_prefix_caching": False}
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def run(model: Path, prompts: list[list[int]], **engine: object) -> tuple[list[list[int]], list[torch.Tensor], LLM]:
    """Greedy tokens, every step's logits, and the (closed) engine."""
    llm = LLM(str(model), **{**ENGINE, **engine})  # type: ignore[arg-type]
    rec = Recorder(llm)
    try:
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    finally:
        llm.close()
    return tokens, rec.steps, llm


def assert_plan_keeps_model_exact(model: Path, plan: KVCachePlan, path: Path, tol: float) -> tuple[LLM, LLM]:
    """Serve prompts without and with `plan` (saved at `path`): the same greedy tokens,
    and every step's logits within `tol` relative; the two (closed) engines."""
    plan.save(path)
    prompts = prompts_of(3, 20, seed=2)
    ref_tokens, ref_logits, ref = run(model, prompts)
    tokens, logits, llm = run(model, prompts, kv_cache_plan=str(path))
    assert tokens == ref_tokens
    got, want = torch.cat(logits), torch.cat(ref_logits)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < tol, err
    return ref, llm


def prompts_of(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 250, (n, length), generator=g).tolist()


def random_vectors(cfg: ModelConfig, seed: int) -> dict[int, list[list[float]]]:
    g = torch.Generator().manual_seed(seed)
    return {
        i: smoothing_vectors(torch.rand(cfg.num_kv_heads, cfg.head_dim, generator=g) * 10 + 0.1, 1.0, cfg.qk_norm).tolist()
        for i in range(cfg.num_layers)
    }


def test_vectors_scale_each_rotation_pair_alike() -> None:
    amax = torch.rand(2, 16) * 5 + 0.01
    assert torch.equal(smoothing_vectors(amax, 0.0), torch.ones(2, 16))
    s = smoothing_vectors(amax, 1.0)
    assert torch.equal(s[:, :8], s[:, 8:])
    torch.testing.assert_close(s.log().mean(-1), torch.zeros(2), atol=1e-5, rtol=0)
    # alpha 1 flattens: every pair's largest |k| / s is the same within a head.
    pair_max = torch.maximum(amax[:, :8], amax[:, 8:])
    flat = pair_max / s[:, :8]
    torch.testing.assert_close(flat, flat[:, :1].expand_as(flat))
    shared = smoothing_vectors(amax, 0.5, shared=True)
    assert torch.equal(shared[0], shared[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_keeps_the_model_exact(tiny_checkpoints: dict[str, Path], family: str, tmp_path: Path) -> None:
    """Smoothing on plain-KV layers changes nothing the model computes (fp32: rounding
    only), and it did change the weights (q/k rows, or the q/k norms of Qwen3)."""
    model = tiny_checkpoints[family]
    cfg = ModelConfig.from_dir(model)
    plan = KVCachePlan(("auto",) * cfg.num_layers, k_smooth=random_vectors(cfg, seed=1))
    ref, llm = assert_plan_keeps_model_exact(model, plan, tmp_path / "plan.json", 1e-5)
    a, b = ref.engine.model.layers[0].self_attn, llm.engine.model.layers[0].self_attn
    changed = a.k_norm.weight if cfg.qk_norm else a.qkv_proj.weight, b.k_norm.weight if cfg.qk_norm else b.qkv_proj.weight
    assert not torch.equal(*changed)
    # Stored keys are k / s: the block-key namespace says so.
    assert llm.engine.kv_spec.namespace_format(torch.float32) == f"model;ktransform={plan.k_transform_id()}"
    assert ref.engine.kv_spec.namespace_format(torch.float32) == "model"


@pytest.fixture(scope="module")
def outlier_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 whose layer-0 k_proj bias puts one rotation pair of KV head 0 far
    above the other channels, as Qwen2.5's first layers do."""
    out = write_random_checkpoint(tmp_path_factory.mktemp("outlier") / "qwen2", "qwen2", seed=7)
    weights = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.bias"
    d = ModelConfig.from_dir(out).head_dim
    bias = weights[name].clone()
    bias[3] += 40.0
    bias[3 + d // 2] -= 40.0
    weights[name] = bias
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_calibration_smooths_outlier_channels_and_int8_gets_closer(outlier_qwen2: Path, tmp_path: Path) -> None:
    from rtpllm.engine.kv_calibrate import measure

    calib = prompts_of(4, 48, seed=3)
    found = measure(str(outlier_qwen2), calib)
    unsmoothed = found.candidates["int8~0"]
    # Layer 0's int8 error falls ~3x with its smoothing; the plan file keeps it.
    assert 0 in found.k_smooth and found.errors["int8"][0] < unsmoothed[0] / 2, (found.errors, unsmoothed)
    plan = found.plan(["int8"] * len(found.errors["int8"]), None)
    plan.save(tmp_path / "plan.json")
    loaded = KVCachePlan.load(tmp_path / "plan.json")
    assert loaded.k_smooth == plan.k_smooth and 0 in loaded.k_smooth_alpha
    assert torch.equal(loaded.smoothing_vectors()[0], torch.tensor(found.k_smooth[0]))

    # Served: int8 KV with the plan's smoothing is closer to fp32 KV than int8 without
    # (the prefill step's logits: later steps may decode different tokens).
    prompts = prompts_of(3, 40, seed=4)
    _, exact, _ = run(outlier_qwen2, prompts)
    _, plain, plain_llm = run(outlier_qwen2, prompts, kv_cache_dtype="int8")
    _, smoothed, smooth_llm = run(outlier_qwen2, prompts, kv_cache_plan=str(tmp_path / "plan.json"))
    err_plain = (plain[0] - exact[0]).norm().item()
    err_smoothed = (smoothed[0] - exact[0]).norm().item()
    assert err_smoothed < err_plain / 2, (err_smoothed, err_plain)
    spaces = {llm.engine.kv_spec.namespace_format(torch.float32) for llm in (plain_llm, smooth_llm)}
    assert len(spaces) == 2


def test_vectors_that_cannot_be_exact_are_refused(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_checkpoints["llama"]
    cfg = ModelConfig.from_dir(model)
    good = random_vectors(cfg, seed=5)[0]
    unpaired = [row[:] for row in good]
    unpaired[0][0] *= 2.0
    cases = {
        "alike": unpaired,
        "the model needs": [row[: cfg.head_dim // 2] * 2 for row in good[:1]],
        "finite and positive": [[-x for x in row] for row in good],
    }
    for message, rows in cases.items():
        KVCachePlan(("int8",) * cfg.num_layers, k_smooth={0: rows}).save(tmp_path / "bad.json")
        with pytest.raises(ValueError, match=message):
            LLM(str(model), device="cpu", num_blocks=8, kv_cache_plan=str(tmp_path / "bad.json"))
    doc = json.loads(KVCachePlan(("int8",) * cfg.num_layers).to_json())
    doc["k_smooth"] = {str(cfg.num_layers): good}
    (tmp_path / "beyond.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="the plan has"):
        KVCachePlan.load(tmp_path / "beyond.json")


def test_calibration_cli_writes_a_smoothed_plan_an_engine_serves(
    outlier_qwen2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rtpllm.engine.kv_calibrate import main

    out = tmp_path / "plan.json"
    assert main([str(outlier_qwen2), "--out", str(out), "--formats", "int8", "--threshold", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "layer   0: int8=" in printed and "K smoothing, alpha" in printed
    plan = KVCachePlan.load(out)
    assert plan.layers == ("int8",) * len(plan.layers) and 0 in plan.k_smooth
    tokens, _, _ = run(outlier_qwen2, prompts_of(2, 16, seed=6), kv_cache_plan=str(out))
    assert all(len(t) == GREEDY.max_tokens for t in tokens)
    main([str(outlier_qwen2), "--out", str(out), "--formats", "int8", "--no-k-smoothing"])
    assert not KVCachePlan.load(out).k_smooth


def test_k_smoothing_folds_into_each_ranks_own_heads(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A plan's K smoothing vectors (rtpllm.models.k_smoothing) go into every rank's
    share of the q/k rows: TP=2 computes what TP=1 does with the same plan. On int8
    KV, since any vector keeps plain attention exact: the stored keys are k / s, so a
    rank folding another head's vector quantizes other values."""
    model = tiny_checkpoints["qwen2"]
    cfg = ModelConfig.from_dir(model)
    g = torch.Generator().manual_seed(3)
    vectors = {i: smoothing_vectors(torch.rand(cfg.num_kv_heads, cfg.head_dim, generator=g) * 10 + 0.1, 1.0).tolist() for i in range(cfg.num_layers)}
    KVCachePlan(("int8",) * cfg.num_layers, k_smooth=vectors).save(tmp_path / "plan.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one per rank on two shared cores (test_tensor_parallel.py)
    pair = Pair(model, kv_cache_plan=str(tmp_path / "plan.json"))
    try:
        pair.generate(prompts_of(2, 20, seed=9))
    finally:
        pair.close()
        torch.set_num_threads(threads)
