"""The Qwen2-VL and Idefics3 vision towers against HF transformers: tiny random-weight
checkpoints built here, saved with save_pretrained, loaded by our towers from the
safetensors, and the image embeddings compared with HF's get_image_features (fp32, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from rtpllm.loader.weights import CheckpointError
from rtpllm.multimodal.idefics3_processor import Idefics3ImageConfig, Idefics3ImageProcessor
from rtpllm.multimodal.idefics3_vision import Idefics3VisionConfig, Idefics3VisionTower
from rtpllm.multimodal.qwen2_vl_processor import Qwen2VLImageConfig, Qwen2VLImageProcessor
from rtpllm.multimodal.qwen2_vl_vision import Qwen2VLVisionConfig, Qwen2VLVisionTower

ATOL = 1e-4
# (height, width) of up to three images per request: different sizes and aspect ratios.
SIZES = [(100, 60), (56, 56), (90, 200)]


def random_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from HF's init (std 0.02), so embeddings are O(1) and a wrong op shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() > 1 else 0.5))


def save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def rename_tensors(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of a checkpoint whose tensor names have `old` prefixes replaced by `new`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    save_file(
        {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in tensors.items()},
        str(dst / "model.safetensors"),
    )
    return dst


def assert_close(ours: list[torch.Tensor], ref: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> None:
    assert [o.shape for o in ours] == [r.shape for r in ref]
    for o, r in zip(ours, ref, strict=True):
        assert r.abs().max() > 0.1  # embeddings of substance, so ATOL means something
        err = (o - r).abs().max().item()
        assert err < ATOL, f"max abs diff {err:.2e}"


# ---------------------------------------------------------------- Qwen2-VL


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Qwen2VLForConditionalGeneration]:
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 48,  # the merger's output: the LM width
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        text_config={
            "hidden_size": 48,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
        },
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    randomize(model, seed=0)
    return save(model, tmp_path_factory.mktemp("qwen2_vl")), model


def qwen2_vl_inputs(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    processor = Qwen2VLImageProcessor(Qwen2VLImageConfig(max_pixels=28 * 28 * 20))
    inputs = processor([random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES[:count])])
    return inputs.pixel_values, inputs.image_grid_thw


@pytest.mark.parametrize("count", [1, 3])
def test_qwen2_vl_tower_matches_hf(
    qwen2_vl: tuple[Path, Qwen2VLForConditionalGeneration], count: int
) -> None:
    path, hf = qwen2_vl
    pixel_values, grid_thw = qwen2_vl_inputs(count)
    tower = Qwen2VLVisionTower.from_pretrained(path)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values, grid_thw).pooler_output
        ours = tower.encode(pixel_values, grid_thw)
    assert_close(ours, ref)


def test_qwen2_vl_config_from_checkpoint(qwen2_vl: tuple[Path, Qwen2VLForConditionalGeneration]) -> None:
    path, _ = qwen2_vl
    config = Qwen2VLVisionConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert (config.depth, config.embed_dim, config.out_hidden_size, config.num_heads) == (2, 64, 48, 4)
    assert config.hidden_act == "quick_gelu" and config.rope_theta == 10000.0
    # Qwen's released config.json spells the channel count `in_chans`.
    assert Qwen2VLVisionConfig.from_hf({"vision_config": {"in_chans": 1}}).in_channels == 1


@pytest.mark.parametrize("prefix", ["model.visual.", ""])
def test_qwen2_vl_tower_loads_other_checkpoint_prefixes(
    qwen2_vl: tuple[Path, Qwen2VLForConditionalGeneration], tmp_path: Path, prefix: str
) -> None:
    path, hf = qwen2_vl
    renamed = rename_tensors(path, tmp_path / "renamed", "visual.", prefix)
    pixel_values, grid_thw = qwen2_vl_inputs(2)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values, grid_thw).pooler_output
        ours = Qwen2VLVisionTower.from_pretrained(renamed).encode(pixel_values, grid_thw)
    assert_close(ours, ref)


def test_qwen2_vl_missing_tensor_is_named(
    qwen2_vl: tuple[Path, Qwen2VLForConditionalGeneration], tmp_path: Path
) -> None:
    path, _ = qwen2_vl
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["visual.blocks.1.mlp.fc2.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="visual.blocks.1.mlp.fc2.weight"):
        Qwen2VLVisionTower.from_pretrained(broken)


# ---------------------------------------------------------------- Idefics3


@pytest.fixture(scope="module")
def idefics3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Idefics3ForConditionalGeneration]:
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": 48,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 128,
        },
        scale_factor=2,
        image_token_id=100,
    )
    torch.manual_seed(1)
    model = Idefics3ForConditionalGeneration(config).eval()
    randomize(model, seed=1)
    return save(model, tmp_path_factory.mktemp("idefics3")), model


def idefics3_inputs(count: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    # Tiles of 64 pixels (the tower's image_size), images up to 2x2 tiles + global.
    processor = Idefics3ImageProcessor(Idefics3ImageConfig(longest_edge=2 * 64, max_image_size=64))
    inputs = processor([random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES[:count])])
    return inputs.pixel_values, inputs.pixel_attention_mask, inputs.tiles_per_image


def hf_idefics3_features(
    hf: Idefics3ForConditionalGeneration, pixel_values: torch.Tensor, mask: torch.Tensor, tiles: list[int]
) -> list[torch.Tensor]:
    # HF takes (batch, tiles, ...) and returns one flat tensor per batch row: one row per image.
    return [
        hf.model.get_image_features(v[None], m[None].long()).pooler_output[0]
        for v, m in zip(pixel_values.split(tiles), mask.split(tiles), strict=True)
    ]


@pytest.mark.parametrize("count", [1, 3])
def test_idefics3_tower_matches_hf(
    idefics3: tuple[Path, Idefics3ForConditionalGeneration], count: int
) -> None:
    path, hf = idefics3
    pixel_values, mask, tiles = idefics3_inputs(count)
    tower = Idefics3VisionTower.from_pretrained(path)
    with torch.no_grad():
        ref = hf_idefics3_features(hf, pixel_values, mask, tiles)
        ours = tower.encode(pixel_values, mask, tiles)
    assert_close(ours, ref)
    assert tower.config.image_seq_len == hf.model.image_seq_len == ours[0].shape[0] // tiles[0]


def test_idefics3_padded_tiles_match_hf(idefics3: tuple[Path, Idefics3ForConditionalGeneration]) -> None:
    """Partial tiles: masked patches are hidden as keys and positions are resampled."""
    path, hf = idefics3
    pixel_values, mask, _ = idefics3_inputs(1)
    pixel_values, mask = pixel_values[:3].clone(), mask[:3].clone()
    pixel_values[0, :, 40:, :], mask[0, 40:, :] = 0, False  # 5 of 8 patch rows real
    pixel_values[1, :, :, 20:], mask[1, :, 20:] = 0, False  # a partial patch column counts as real
    tower = Idefics3VisionTower.from_pretrained(path)
    with torch.no_grad():
        ref = hf_idefics3_features(hf, pixel_values, mask, [3])
        ours = tower.encode(pixel_values, mask, [3])
        unmasked = tower.encode(pixel_values, None, [3])
    assert_close(ours, ref)
    assert (unmasked[0] - ref[0]).abs().max() > 1e-2  # the mask matters here


def test_idefics3_tower_loads_a_bare_checkpoint(
    idefics3: tuple[Path, Idefics3ForConditionalGeneration], tmp_path: Path
) -> None:
    path, hf = idefics3
    bare = rename_tensors(path, tmp_path / "bare", "model.", "")
    pixel_values, mask, tiles = idefics3_inputs(2)
    with torch.no_grad():
        ref = hf_idefics3_features(hf, pixel_values, mask, tiles)
        ours = Idefics3VisionTower.from_pretrained(bare).encode(pixel_values, mask, tiles)
    assert_close(ours, ref)


def test_idefics3_config_from_checkpoint(idefics3: tuple[Path, Idefics3ForConditionalGeneration]) -> None:
    path, _ = idefics3
    config = Idefics3VisionConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert (config.hidden_size, config.num_layers, config.image_size, config.patch_size) == (32, 2, 64, 8)
    assert (config.scale_factor, config.text_hidden_size, config.hidden_act) == (2, 48, "gelu_pytorch_tanh")


@pytest.mark.parametrize("seq_lens", [[5], [4, 4, 4], [4, 6, 4, 6, 6], [3, 7, 3]])
def test_block_diagonal_attention_equals_one_call_per_image(seq_lens: list[int]) -> None:
    """Images of one size share a batched attention call (contiguous or gathered rows);
    the result equals attending within each image on its own."""
    from rtpllm.multimodal.qwen2_vl_vision import _block_diagonal_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(seq_lens), 2, 8, generator=gen) for _ in range(3))
    ref = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(a.transpose(0, 1), b.transpose(0, 1), c.transpose(0, 1)).transpose(0, 1)
            for a, b, c in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens), strict=True)
        ]
    )
    torch.testing.assert_close(_block_diagonal_attention(q, k, v, seq_lens), ref)
