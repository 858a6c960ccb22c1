"""Model hyper-parameters read from an HF `config.json`, normalised across families."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Architectures this engine implements, mapped to the family switches they need.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    # Vision-language models: their language model is one of the families above.
    "Qwen2VLForConditionalGeneration": "qwen2",
    "Idefics3ForConditionalGeneration": "llama",
}

# Vision-language architectures -> (vision family in rtpllm.multimodal, where the
# language model's tensors sit in the checkpoint, the prefixes of the vision tower's
# tensors, which the language model's loader skips).
VISION_ARCHITECTURES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "model.", ("visual.", "model.visual.")),
    "Idefics3ForConditionalGeneration": ("idefics3", "model.text_model.", ("model.vision_model.", "model.connector.")),
}


# A feature layer (DecoderLM.set_feature_layers) naming the model's final-normed output,
# what the LM head reads; layer indices name the residual stream entering a layer.
FINAL_HIDDEN = -1


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is one of default, linear, llama3, yarn."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    # Qwen2-VL's M-RoPE: rotary pairs per axis (temporal, height, width), summing to
    # head_dim / 2; None for 1-D positions.
    mrope_section: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape shared by the Llama, Mistral and Qwen2/3 families."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"
    # Vision-language models: the vision family ("qwen2_vl", "idefics3"), the checkpoint
    # prefix of the language model's tensors and the prefixes of the vision tower's.
    vision: str | None = None
    weight_prefix: str = "model."
    vision_prefixes: tuple[str, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        vision, weight_prefix, vision_prefixes = VISION_ARCHITECTURES.get(arch, (None, "model.", ()))
        if vision is not None:
            # The language model's settings: in `text_config` (transformers 5), or at the
            # top level (Qwen's original Qwen2-VL configs). The head is tied when either
            # level says so, as transformers reads it.
            tied = bool(raw.get("tie_word_embeddings")) or bool((raw.get("text_config") or {}).get("tie_word_embeddings"))
            defaults = {"rms_norm_eps": 1e-5} if vision == "idefics3" else {}  # Idefics3Config's text default
            raw = {**defaults, **raw, **(raw.get("text_config") or {}), "tie_word_embeddings": tied}
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r}; only silu is implemented")
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        head_dim = raw.get("head_dim") or hidden // num_heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        sliding = raw.get("sliding_window")
        if family == "qwen2" or family == "qwen3":
            # Qwen configs carry a sliding_window value but only use it when asked to.
            sliding = sliding if raw.get("use_sliding_window") else None
        return cls(
            architecture=arch,
            family=family,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            rope=_rope_from_dict(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama/Qwen3 say so with attention_bias.
            attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            vision=vision,
            weight_prefix=weight_prefix,
            vision_prefixes=vision_prefixes,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json; expected an HF-format model directory")
        return cls.from_dict(json.loads(path.read_text()))


def _rope_from_dict(raw: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); older checkpoints use
    # `rope_theta` + `rope_scaling`. Accept both.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    # Qwen2-VL's original configs name M-RoPE a rope type; it is default RoPE whose
    # rotary pairs take their positions from three axes (`mrope_section`).
    if rope_type == "mrope":
        rope_type = "default"
    section = params.get("mrope_section")
    # "dynamic" NTK rescales with the running sequence length, which a paged engine with
    # shared prefix blocks cannot reproduce exactly; refuse it rather than drift from HF.
    known = {"default", "linear", "llama3", "yarn"}
    if rope_type not in known:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(sorted(known))}")
    orig = params.get("original_max_position_embeddings")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(orig) if orig else None,
        beta_fast=float(params.get("beta_fast", 32.0)),
        beta_slow=float(params.get("beta_slow", 1.0)),
        attention_factor=params.get("attention_factor"),
        mrope_section=tuple(int(s) for s in section) if section else None,
    )
