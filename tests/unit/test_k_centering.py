"""K centering (rtpllm.models.k_centering, docs/kv_quantization.md): a shift subtracted
from the rotated keys leaves attention exact, the calibration finds it where keys carry
a constant offset, fp8 and int8 KV get closer to the unquantized model with it, the plan
file carries it into the block-key namespace, tensor-parallel ranks take their own
heads' shifts, and shifts the model cannot take are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rtpllm import LLM
from rtpllm.kvcache.kv_plan import KVCachePlan
from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.models.config import ModelConfig
from tests.conftest import FAMILIES
from tests.unit.test_k_smoothing import GREEDY, assert_plan_keeps_model_exact, prompts_of, random_vectors, run
from tests.unit.test_tensor_parallel import Pair


def random_shifts(cfg: ModelConfig, seed: int, scale: float = 20.0) -> dict[int, list[list[float]]]:
    g = torch.Generator().manual_seed(seed)
    return {i: (torch.randn(cfg.num_kv_heads, cfg.head_dim, generator=g) * scale).tolist() for i in range(cfg.num_layers)}


@pytest.mark.parametrize("family", FAMILIES)
def test_centering_keeps_the_model_exact(tiny_checkpoints: dict[str, Path], family: str, tmp_path: Path) -> None:
    """Large shifts on plain-KV layers change nothing the model computes (fp32: rounding
    only), the layers hold them, and the stored keys' namespace says so."""
    model = tiny_checkpoints[family]
    cfg = ModelConfig.from_dir(model)
    plan = KVCachePlan(("auto",) * cfg.num_layers, k_center=random_shifts(cfg, seed=1))
    ref, llm = assert_plan_keeps_model_exact(model, plan, tmp_path / "plan.json", 1e-4)
    shift = llm.engine.model.layers[0].self_attn.k_shift
    assert shift is not None and torch.equal(shift, torch.tensor(plan.k_center[0]))
    assert ref.engine.model.layers[0].self_attn.k_shift is None
    assert llm.engine.kv_spec.namespace_format(torch.float32) == f"model;ktransform={plan.k_transform_id()}"


def test_centering_and_smoothing_together_keep_the_model_exact(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_checkpoints["qwen2"]
    cfg = ModelConfig.from_dir(model)
    plan = KVCachePlan(("auto",) * cfg.num_layers, k_smooth=random_vectors(cfg, seed=3), k_center=random_shifts(cfg, seed=4))
    assert_plan_keeps_model_exact(model, plan, tmp_path / "plan.json", 1e-4)


def test_the_digest_follows_the_shifts(tiny_checkpoints: dict[str, Path]) -> None:
    cfg = ModelConfig.from_dir(tiny_checkpoints["llama"])
    layers = ("int8",) * cfg.num_layers
    a, b = random_shifts(cfg, seed=1), random_shifts(cfg, seed=2)
    smooth = random_vectors(cfg, seed=3)
    ids = {
        KVCachePlan(layers).k_transform_id(),
        KVCachePlan(layers, k_center=a).k_transform_id(),
        KVCachePlan(layers, k_center=b).k_transform_id(),
        KVCachePlan(layers, k_smooth=smooth).k_transform_id(),
        KVCachePlan(layers, k_smooth=smooth, k_center=a).k_transform_id(),
    }
    assert len(ids) == 5 and KVCachePlan(layers).k_transform_id() == ""
    assert KVCachePlan(layers, k_center=a).k_transform_id() == KVCachePlan(layers, k_center=a).k_transform_id()


@pytest.fixture(scope="module")
def offset_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 whose layer-0 k_proj bias adds a large constant to KV head 0's
    lowest-frequency rotation pair, which RoPE barely turns over a prompt: every key
    carries the same offset, as Qwen2.5's first layers' keys do."""
    out = write_random_checkpoint(tmp_path_factory.mktemp("offset") / "qwen2", "qwen2", seed=11)
    weights = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.bias"
    d = ModelConfig.from_dir(out).head_dim
    bias = weights[name].clone()
    bias[d // 2 - 1] += 60.0
    bias[d - 1] += 60.0
    weights[name] = bias
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_calibration_centers_a_key_offset_and_the_cache_gets_closer(offset_qwen2: Path, tmp_path: Path, fmt: str) -> None:
    from rtpllm.engine.kv_calibrate import measure

    found = measure(str(offset_qwen2), prompts_of(4, 48, seed=3), formats=[fmt], smooth_alphas=())
    raw = found.candidates[f"{fmt}~raw"]
    # Layer 0's error falls severalfold once its keys are centered.
    assert found.errors[fmt][0] < raw[0] / 3, (found.errors, raw)
    # Each layer keeps the better of centered and raw, and the plan shifts exactly the
    # layers that measured better centered.
    for i, err in enumerate(found.errors[fmt]):
        assert err <= raw[i] and (i in found.centered[fmt]) == (err < raw[i])
    plan = found.plan([fmt] * len(raw), None)
    assert set(plan.k_center) == found.centered[fmt] and 0 in plan.k_center
    mean = torch.tensor(plan.k_center[0])
    assert mean[0, -1] > 30 and mean[0, mean.shape[1] // 2 - 1] > 30  # the offset, found
    plan.save(tmp_path / "plan.json")
    assert KVCachePlan.load(tmp_path / "plan.json").k_center == plan.k_center

    # Served: the centered cache's prefill logits are closer to fp32 KV's than the plain one's.
    prompts = prompts_of(3, 40, seed=4)
    _, exact, _ = run(offset_qwen2, prompts)
    _, plain, plain_llm = run(offset_qwen2, prompts, kv_cache_dtype=fmt)
    _, centered, centered_llm = run(offset_qwen2, prompts, kv_cache_plan=str(tmp_path / "plan.json"))
    err_plain = (plain[0] - exact[0]).norm().item()
    err_centered = (centered[0] - exact[0]).norm().item()
    assert err_centered < err_plain / 2, (err_centered, err_plain)
    spaces = {llm.engine.kv_spec.namespace_format(torch.float32) for llm in (plain_llm, centered_llm)}
    assert len(spaces) == 2


def test_plan_centers_only_quantized_layers_in_their_smoothed_units(offset_qwen2: Path) -> None:
    """The plan keeps shifts for quantized layers only; where a layer is smoothed (k / s
    stored), its shift is the mean divided by s, what the smoothed model's keys average."""
    from rtpllm.engine.kv_calibrate import measure

    found = measure(str(offset_qwen2), prompts_of(4, 48, seed=3))
    n = len(found.errors["int8"])
    assert sorted(found.k_mean) == list(range(n))
    layers = ["int8"] + ["auto"] * (n - 2) + ["fp8"]
    found.centered["fp8"].add(n - 1)  # as if its fp8 keys had measured better centered
    plan = found.plan(layers, None)
    assert 0 in found.centered["int8"] and sorted(plan.k_center) == [0, n - 1]
    mean = torch.tensor(found.k_mean[0])
    expected = mean / torch.tensor(plan.k_smooth[0]) if 0 in plan.k_smooth else mean
    torch.testing.assert_close(torch.tensor(plan.k_center[0]), expected)
    torch.testing.assert_close(torch.tensor(plan.k_center[n - 1]), torch.tensor(found.k_mean[n - 1]))
    found.centered["fp8"].discard(n - 1)
    assert sorted(found.plan(layers, None).k_center) == [0]


def test_calibration_cli_centers_by_default(offset_qwen2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rtpllm.engine.kv_calibrate import main

    out = tmp_path / "plan.json"
    assert main([str(offset_qwen2), "--out", str(out), "--formats", "fp8", "--threshold", "1.0"]) == 0
    assert "K centering; uncentered fp8" in capsys.readouterr().out
    plan = KVCachePlan.load(out)
    assert 0 in plan.k_center
    tokens, _, _ = run(offset_qwen2, prompts_of(2, 16, seed=6), kv_cache_plan=str(out))
    assert all(len(t) == GREEDY.max_tokens for t in tokens)
    main([str(offset_qwen2), "--out", str(out), "--formats", "fp8", "--no-k-centering"])
    assert not KVCachePlan.load(out).k_center


def test_shifts_the_model_cannot_take_are_refused(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_checkpoints["llama"]
    cfg = ModelConfig.from_dir(model)
    good = random_shifts(cfg, seed=5)[0]
    cases = {
        "the model needs": [row[: cfg.head_dim // 2] for row in good],
        "must be finite": [[float("nan")] + row[1:] for row in good],
    }
    for message, rows in cases.items():
        KVCachePlan(("int8",) * cfg.num_layers, k_center={0: rows}).save(tmp_path / "bad.json")
        with pytest.raises(ValueError, match=message):
            LLM(str(model), device="cpu", num_blocks=8, kv_cache_plan=str(tmp_path / "bad.json"))
    doc = json.loads(KVCachePlan(("int8",) * cfg.num_layers).to_json())
    doc["k_center"] = {str(cfg.num_layers): good}
    (tmp_path / "beyond.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="K centering for layer .* the plan has"):
        KVCachePlan.load(tmp_path / "beyond.json")
    doc["k_center"] = {"0": "not vectors"}
    (tmp_path / "shape.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="must map layer numbers to lists of vectors"):
        KVCachePlan.load(tmp_path / "shape.json")


def test_each_rank_takes_its_own_heads_shifts(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """TP=2 with a plan's shifts computes what TP=1 does, on int8 KV: the stored keys
    are k - m, so a rank subtracting another head's shift would quantize other values."""
    model = tiny_checkpoints["qwen2"]
    cfg = ModelConfig.from_dir(model)
    KVCachePlan(("int8",) * cfg.num_layers, k_center=random_shifts(cfg, seed=7, scale=5.0)).save(tmp_path / "plan.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one per rank on two shared cores (test_tensor_parallel.py)
    pair = Pair(model, kv_cache_plan=str(tmp_path / "plan.json"))
    try:
        pair.generate(prompts_of(2, 20, seed=9))
        assert pair.one.engine.model.layers[0].self_attn.k_shift is not None
    finally:
        pair.close()
        torch.set_num_threads(threads)
