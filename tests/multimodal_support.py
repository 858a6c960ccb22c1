"""Tiny random-weight vision-language checkpoints for the tests: Qwen2-VL and Idefics3
written to disk in HF format (byte-level tokenizer with the family's special tokens,
chat template, preprocessor config), with the same model kept in HF `transformers` as
the reference, and random images as PIL images, PNG bytes or `data:` URLs.

Shared by the unit tests (parity with HF, prompt building, routing keys) and the
integration tests (a gateway serving the Qwen2-VL checkpoint).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from rtpllm.multimodal.random_checkpoint import QWEN2_VL_CHAT_TEMPLATE

# The models' own chat templates (Qwen2-VL's, shared with the random checkpoints, and Idefics3's processor template).
QWEN2_VL_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
QWEN2_VL_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
IDEFICS3_SPECIALS = [
    "<|begin_of_text|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
TEXT_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "max_position_embeddings": 1024,
}
# The checkpoints' preprocessor configs: small images, few placeholder tokens.
QWEN2_VL_PREPROCESSOR = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16}
IDEFICS3_PREPROCESSOR = {
    "size": {"longest_edge": 112},
    "max_image_size": {"longest_edge": 56},
    "do_image_splitting": True,
}


def random_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: HF sees the same pixels
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and which carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def data_url(image: Image.Image | bytes, mime: str = "image/png") -> str:
    data = image if isinstance(image, bytes) else png_bytes(image)
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def write_tokenizer(out: Path, specials: list[str], eos: str, template: str) -> dict[str, int]:
    """Byte-level, no merges, with the family's special tokens; returns their ids."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos,
        "add_bos_token": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return {s: tok.token_to_id(s) for s in specials}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from HF's init, so activations are O(1), generations vary and a wrong
    op shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:
                p.copy_(noise * 0.3)
            else:  # norm scales near 1, biases around 0
                p.copy_(1 + 0.3 * noise if "norm" in name or "ln_" in name else 0.5 * noise)


@dataclass
class TinyVLM:
    """A tiny checkpoint on disk, the same model in HF, and how to feed HF its images."""

    name: str
    path: Path
    hf: torch.nn.Module
    image_token_id: int
    hf_pixels: Callable[[list[Image.Image]], dict[str, torch.Tensor]]

    def hf_logits(self, ids: list[int], images: list[Image.Image]) -> torch.Tensor:
        with torch.no_grad():
            return self.hf(**self._inputs(ids, images)).logits[0].float()

    def hf_reference(
        self, ids: list[int], images: list[Image.Image], max_tokens: int = 8
    ) -> tuple[list[int], torch.Tensor]:
        """HF's greedy tokens (`generate`, its own KV cache and M-RoPE deltas) and the
        logits of every position that computes: the prompt's from a forward pass, the
        outputs' from generate's steps (a forward over prompt + outputs would take an
        image token the model generated for a placeholder)."""
        inputs = self._inputs(ids, images)
        with torch.no_grad():
            prompt_logits = self.hf(**inputs).logits[0].float()
            out = self.hf.generate(
                **inputs,
                attention_mask=torch.ones_like(inputs["input_ids"]),
                max_new_tokens=max_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        steps = torch.stack([step[0] for step in out.logits]).float()
        assert torch.allclose(steps[0], prompt_logits[-1], rtol=1e-4, atol=1e-4)
        return out.sequences[0, len(ids) :].tolist(), torch.cat([prompt_logits, steps[1:]])

    def _inputs(self, ids: list[int], images: list[Image.Image]) -> dict[str, Any]:
        input_ids = torch.tensor([ids])
        inputs: dict[str, Any] = {"input_ids": input_ids}
        if images:
            inputs.update(self.hf_pixels(images))
            if self.name == "qwen2_vl":
                inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).int()
        return inputs


def write_qwen2_vl(path: Path) -> TinyVLM:
    """A tiny random-weight Qwen2-VL checkpoint in `path` (created if missing)."""
    path.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(path, QWEN2_VL_SPECIALS, "<|im_end|>", QWEN2_VL_TEMPLATE)
    config = Qwen2VLConfig(
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2},
        text_config={
            **TEXT_SHAPE,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "eos_token_id": ids["<|im_end|>"],
            "bos_token_id": None,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    hf = Qwen2VLForConditionalGeneration(config).eval()
    randomize(hf, seed=0)
    hf.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    hf.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN2_VL_PREPROCESSOR))
    processor = Qwen2VLImageProcessorPil(**QWEN2_VL_PREPROCESSOR)

    def pixels(images: list[Image.Image]) -> dict[str, torch.Tensor]:
        out = processor(images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    return TinyVLM("qwen2_vl", path, hf, ids["<|image_pad|>"], pixels)


def write_idefics3(path: Path) -> TinyVLM:
    """A tiny random-weight Idefics3 checkpoint in `path` (created if missing)."""
    path.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(path, IDEFICS3_SPECIALS, "<end_of_utterance>", IDEFICS3_TEMPLATE)
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 56,
            "patch_size": 14,
        },
        text_config={
            "model_type": "llama",
            **TEXT_SHAPE,
            "rms_norm_eps": 1e-6,
            "eos_token_id": ids["<end_of_utterance>"],
            "bos_token_id": ids["<|begin_of_text|>"],
        },
        scale_factor=2,
        image_token_id=ids["<image>"],
    )
    torch.manual_seed(0)
    hf = Idefics3ForConditionalGeneration(config).eval()
    randomize(hf, seed=1)
    hf.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    hf.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(IDEFICS3_PREPROCESSOR))
    processor = Idefics3ImageProcessorPil(**IDEFICS3_PREPROCESSOR)

    def pixels(images: list[Image.Image]) -> dict[str, torch.Tensor]:
        out = processor([images], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"]}

    return TinyVLM("idefics3", path, hf, ids["<image>"], pixels)


WRITERS: dict[str, Callable[[Path], TinyVLM]] = {"qwen2_vl": write_qwen2_vl, "idefics3": write_idefics3}
