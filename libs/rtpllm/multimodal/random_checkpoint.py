"""Config-only Qwen2-VL checkpoints: a directory that engines and vision services load
with random weights (`--load-format dummy --seed S`), for benchmarks of full-size shapes
on machines with nothing to download.

The directory holds `config.json` (Qwen's original Qwen2-VL layout: the language
model's settings at the top level, `vision_config`, M-RoPE in `rope_scaling`; HF
`transformers` reads it too), `preprocessor_config.json`, and a byte-level tokenizer
whose special tokens sit at the config's token ids, with Qwen2-VL's chat template. No
weights: engines and vision services draw the same tower weights from the same seed.

The tokenizer covers the whole vocabulary so that any id a random model generates
decodes to text: bytes 0-255, then filler entries (" w<id>", reachable only by
decoding: there are no merges), then the specials at their ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from rtpllm.tokenizer.byte_tokenizer import byte_alphabet, write_chatml_tokenizer_config

# Qwen2-VL's processor chat template (what its chat_template.json carries).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's special tokens in id order from <|endoftext|> (151643 in the real vocabulary).
QWEN2_VL_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

# Qwen2-VL-2B-Instruct's shape. `specials_base`: the id of <|endoftext|>.
QWEN2_VL_2B_SHAPE: dict[str, Any] = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "mrope_section": [16, 24, 24],
    "tie_word_embeddings": True,
    "specials_base": 151643,
    "vision": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4},
    "preprocessor": {"min_pixels": 3136, "max_pixels": 12845056},
}

# A CPU-sized model of the same structure (smoke runs of the benchmark, tests).
QWEN2_VL_TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "mrope_section": [2, 3, 3],
    "tie_word_embeddings": True,
    "specials_base": 256,
    "vision": {"depth": 2, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2},
    # At most 28*28*64 pixels (64 image tokens per image), whatever the image's size.
    "preprocessor": {"min_pixels": 3136, "max_pixels": 28 * 28 * 64},
}

SHAPES = {"2b": QWEN2_VL_2B_SHAPE, "tiny": QWEN2_VL_TINY_SHAPE}

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def special_token_ids(shape: dict[str, Any]) -> dict[str, int]:
    base = int(shape["specials_base"])
    if base < 256 or base + len(QWEN2_VL_SPECIALS) > int(shape["vocab_size"]):
        raise ValueError(
            f"specials at {base} do not fit between the bytes and vocab_size {shape['vocab_size']}"
        )
    return {name: base + i for i, name in enumerate(QWEN2_VL_SPECIALS)}


def qwen2_vl_config(shape: dict[str, Any]) -> dict[str, Any]:
    """config.json of a Qwen2-VL checkpoint of `shape` (QWEN2_VL_2B_SHAPE's keys)."""
    ids = special_token_ids(shape)
    vision = shape["vision"]
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_act": "silu",
        "hidden_size": shape["hidden_size"],
        "intermediate_size": shape["intermediate_size"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "vocab_size": shape["vocab_size"],
        "max_position_embeddings": shape["max_position_embeddings"],
        "max_window_layers": shape["num_hidden_layers"],
        "rms_norm_eps": 1e-6,
        "rope_theta": shape["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": list(shape["mrope_section"])},
        "sliding_window": shape["max_position_embeddings"],
        "use_sliding_window": False,
        "tie_word_embeddings": shape["tie_word_embeddings"],
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "depth": vision["depth"],
            "embed_dim": vision["embed_dim"],
            "num_heads": vision["num_heads"],
            "mlp_ratio": vision["mlp_ratio"],
            "hidden_size": shape["hidden_size"],  # the merger's output: the LM width
            "in_chans": 3,
            "hidden_act": "quick_gelu",
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }


def preprocessor_config(shape: dict[str, Any]) -> dict[str, Any]:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
        "min_pixels": shape["preprocessor"]["min_pixels"],
        "max_pixels": shape["preprocessor"]["max_pixels"],
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def build_tokenizer(vocab_size: int, specials: dict[str, int]) -> Tokenizer:
    """Byte-level BPE without merges over the whole vocabulary, `specials` at their ids."""
    alphabet = byte_alphabet()
    by_id = {i: name for name, i in specials.items()}
    # Filler: "Ġw<id>" decodes to " w<id>"; with no merges no text encodes to it.
    vocab = {by_id.get(i, alphabet[i] if i < 256 else f"Ġw{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    for name, i in specials.items():
        if tok.token_to_id(name) != i:
            raise AssertionError(f"{name} got id {tok.token_to_id(name)}, not {i}")
    return tok


def write_tokenizer(out: Path, shape: dict[str, Any]) -> dict[str, int]:
    ids = special_token_ids(shape)
    build_tokenizer(int(shape["vocab_size"]), ids).save(str(out / "tokenizer.json"))
    write_chatml_tokenizer_config(out, QWEN2_VL_CHAT_TEMPLATE, int(shape["max_position_embeddings"]))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}))
    return ids


def write_qwen2_vl_checkpoint(path: str | Path, shape: str | dict[str, Any] = "2b") -> dict[str, int]:
    """Write a config-only Qwen2-VL checkpoint of `shape` ("2b", "tiny" or a dict like
    QWEN2_VL_2B_SHAPE) into `path` (created if missing); returns the special tokens' ids."""
    spec = SHAPES[shape] if isinstance(shape, str) else shape
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(qwen2_vl_config(spec), indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(spec), indent=1))
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": special_token_ids(spec)["<|endoftext|>"],
                "eos_token_id": special_token_ids(spec)["<|im_end|>"],
            }
        )
    )
    return write_tokenizer(out, spec)
