"""Config-only Qwen2-VL checkpoints (rtpllm.multimodal.random_checkpoint): what the
engine, the vision service, the gateway's prompt builder and HF `transformers` read
from them, with random weights drawn from a seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rtpllm.config import CacheConfig, EngineConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.models.config import ModelConfig
from rtpllm.multimodal.encoder import VisionEncoder
from rtpllm.multimodal.families import Qwen2VLFamily, load_vision_family
from rtpllm.multimodal.prompt import expand_image_prompt
from rtpllm.multimodal.random_checkpoint import QWEN2_VL_2B_SHAPE, write_qwen2_vl_checkpoint
from rtpllm.sampling_params import SamplingParams
from rtpllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen2vl-tiny")
    write_qwen2_vl_checkpoint(path, "tiny")
    return path


def _image(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_2b_config_is_qwen2_vl_2b_for_us_and_for_transformers(tmp_path: Path) -> None:
    from transformers import AutoConfig

    ids = write_qwen2_vl_checkpoint(tmp_path, "2b")
    assert not list(tmp_path.glob("*.safetensors"))  # config only
    config = ModelConfig.from_dir(tmp_path)
    assert config.vision == "qwen2_vl" and config.family == "qwen2" and config.tie_word_embeddings
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (1536, 28, 12, 2)
    assert (config.intermediate_size, config.vocab_size) == (8960, 151936)
    assert config.rope.theta == 1e6 and config.rope.mrope_section == (16, 24, 24)
    assert config.eos_token_ids == (151645,)
    family = load_vision_family(tmp_path, config)
    assert isinstance(family, Qwen2VLFamily) and family.image_token_id == ids["<|image_pad|>"] == 151655
    v = family.vision_config
    assert (v.depth, v.embed_dim, v.num_heads, v.mlp_ratio, v.out_hidden_size) == (32, 1280, 16, 4.0, 1536)
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size, v.hidden_act) == (
        14,
        2,
        2,
        "quick_gelu",
    )
    p = family.processor.config
    assert (p.min_pixels, p.max_pixels) == (3136, 12845056)
    # Qwen2-VL's preprocessing: a 1024x768 image is 1036x756 pixels, 999 tokens.
    assert family.processor.grid_thw(768, 1024) == (1, 54, 74)

    hf = AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "Qwen2VLConfig"
    assert hf.text_config.hidden_size == 1536 and hf.text_config.num_hidden_layers == 28
    assert (
        hf.vision_config.depth == 32
        and hf.vision_config.embed_dim == 1280
        and hf.vision_config.hidden_size == 1536
    )
    assert hf.image_token_id == 151655 and hf.vision_start_token_id == 151652
    assert hf.text_config.rope_parameters["mrope_section"] == [16, 24, 24]

    tok = Tokenizer.from_dir(tmp_path)
    for name, i in ids.items():
        assert tok.token_to_id(name) == i and tok.is_special(i)
    assert ids["<|endoftext|>"] == QWEN2_VL_2B_SHAPE["specials_base"] == 151643
    # Every id decodes; filler ids to text (a random model's output streams).
    assert tok.decode([151642, 300, 104, 105]) == " w151642 w300hi"
    assert tok.encode("hi w300", add_special_tokens=False) == [
        104,
        105,
        32,
        119,
        51,
        48,
        48,
    ]  # bytes only: no merges


def test_chat_template_writes_qwen2_vl_image_slots(tiny: Path) -> None:
    tok = Tokenizer.from_dir(tiny)
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}],
        }
    ]
    text = tok.apply_chat_template(messages)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\na<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    )


def test_engine_and_vision_service_draw_the_same_tower_from_the_seed(tiny: Path) -> None:
    config = ModelConfig.from_dir(tiny)
    family = load_vision_family(tiny, config)
    assert family is not None
    tok = Tokenizer.from_dir(tiny)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "hi"}],
        }
    ]
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    prompt, mm = expand_image_prompt(family, tok, ids, [_image(0, 120, 90)])

    engine = LLMEngine(
        EngineConfig(
            model=str(tiny),
            device="cpu",
            load_format="dummy",
            seed=3,
            cache=CacheConfig(num_blocks=64, block_size=16),
        )
    )
    assert engine.vision is not None and engine.vision.image_token_id == family.image_token_id
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, output_kind="final")
    engine.add_request("r", prompt, params, multimodal=mm)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert len(outputs[-1].outputs[0].token_ids) == 4

    # The vision service's encoder with the same seed holds the engine's tower.
    encoder = VisionEncoder.load(tiny, torch.float32, "cpu", random_seed=3)
    engine_tower = engine.runner.multimodal.tower.state_dict()
    for name, value in encoder.tower.state_dict().items():
        assert torch.equal(value, engine_tower[name]), name
    rows = encoder.encode([mm.images[0]])[0]
    assert rows.shape == (mm.images[0].num_embeds, config.hidden_size) and torch.isfinite(rows).all()
