"""Writes random-weight HF-format checkpoints of each supported family.

Tests load them into both rtpllm and HF `transformers` to compare; benchmarks use
full-size shapes (e.g. Llama-3.1-8B) without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rtpllm.tokenizer.byte_tokenizer import write_byte_tokenizer

_FAMILY = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "max_position_embeddings": 1024,
}

LLAMA_3_1_8B_SHAPE: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "rms_norm_eps": 1e-5,
}

# Llama-3.1-70B (141 GB in bf16): the two-GPU tensor-parallel run (bench/tensor_parallel.py).
LLAMA_3_1_70B_SHAPE: dict[str, Any] = {
    **LLAMA_3_1_8B_SHAPE,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}

QWEN3_0_6B_SHAPE: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}

# Qwen2.5-Coder-1.5B-Instruct (qwen2: q/k/v biases), as its GGUF converts
# (bench/real_models.py): the real-weights target of the speculative decoding issue.
QWEN2_5_1_5B_SHAPE: dict[str, Any] = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def make_config(family: str, **overrides: Any) -> dict[str, Any]:
    arch, model_type = _FAMILY[family]
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": 258,  # <|im_end|> of the byte tokenizer
        "torch_dtype": "float32",
        **TINY_SHAPE,
    }
    if family == "qwen3":
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        cfg["attention_bias"] = False
    if family == "mistral":
        cfg["sliding_window"] = None
    cfg.update(overrides)
    return cfg


def weight_specs(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor of a checkpoint of `cfg`, in HF layout and in
    file order; kind is "embed", "linear", "bias" or "norm"."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias")
    qk_norm = cfg["model_type"] == "qwen3"
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (cfg["vocab_size"], hidden), "embed")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (q, hidden), "linear"),
            (p + "self_attn.k_proj.weight", (kv, hidden), "linear"),
            (p + "self_attn.v_proj.weight", (kv, hidden), "linear"),
            (p + "self_attn.o_proj.weight", (hidden, q), "linear"),
        ]
        if bias:
            specs += [(p + f"self_attn.{n}_proj.bias", (size,), "bias") for n, size in (("q", q), ("k", kv), ("v", kv))]
        if qk_norm:
            specs += [(p + "self_attn.q_norm.weight", (head_dim,), "norm"), (p + "self_attn.k_norm.weight", (head_dim,), "norm")]
        specs += [
            (p + "mlp.gate_proj.weight", (inter, hidden), "linear"),
            (p + "mlp.up_proj.weight", (inter, hidden), "linear"),
            (p + "mlp.down_proj.weight", (hidden, inter), "linear"),
            (p + "input_layernorm.weight", (hidden,), "norm"),
            (p + "post_attention_layernorm.weight", (hidden,), "norm"),
        ]
    specs.append(("model.norm.weight", (hidden,), "norm"))
    if not cfg.get("tie_word_embeddings"):
        specs.append(("lm_head.weight", (cfg["vocab_size"], hidden), "linear"))
    return specs


def random_weights(cfg: dict[str, Any], dtype: torch.dtype, seed: int, std: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w: dict[str, torch.Tensor] = {}
    for name, shape, kind in weight_specs(cfg):
        if kind == "norm":
            w[name] = (1.0 + torch.randn(*shape, generator=g) * 0.1).to(dtype)
        else:
            w[name] = (torch.randn(*shape, generator=g) * (1.0 if kind == "embed" else std)).to(dtype)
    return w


def write_random_checkpoint(
    out_dir: str | Path,
    family: str = "llama",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    std: float = 0.2,
    num_shards: int = 1,
    tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Write config.json, safetensors (optionally sharded with an index) and a byte-level
    tokenizer. `overrides` replace config fields (shape, rope_scaling, ...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(family, **overrides)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = random_weights(cfg, dtype, seed, std)
    _save_shards(out, weights, num_shards)
    if tokenizer:
        write_byte_tokenizer(out, cfg["vocab_size"])
        gen = {"eos_token_id": cfg["eos_token_id"]}
        (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def _save_shards(out: Path, weights: dict[str, torch.Tensor], num_shards: int) -> None:
    names = list(weights)
    if num_shards <= 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(names) // num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(num_shards):
        chunk = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: weights[n] for n in chunk}, str(out / fname), metadata={"format": "pt"})
        for n in chunk:
            weight_map[n] = fname
            total += weights[n].numel() * weights[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_random_eagle_head(
    out_dir: str | Path,
    target_dir: str | Path,
    kind: str = "eagle",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    std: float = 0.2,
    draft_vocab_size: int | None = None,
    aux_layer_ids: list[int] | None = None,
    fc_bias: bool = True,
    torch_bin: bool = False,
    **overrides: Any,
) -> Path:
    """A random EAGLE ("eagle") or EAGLE-3 ("eagle3") head for the model at
    `target_dir`, in the layout the EAGLE repository publishes (docs/speculative_decoding.md,
    "EAGLE heads"): config.json and model.safetensors (`torch_bin`: pytorch_model.bin, as
    most published heads ship). EAGLE-3 with `draft_vocab_size` below the target's
    vocabulary drafts over a random subset of it (d2t / t2d). `overrides` replace config
    fields (e.g. hidden_size, to write a head that does not fit)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = json.loads((Path(target_dir) / "config.json").read_text())
    eagle3 = kind == "eagle3"
    if kind not in ("eagle", "eagle3"):
        raise ValueError(f"kind must be 'eagle' or 'eagle3', got {kind!r}")
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "max_position_embeddings", "rms_norm_eps", "rope_theta", "bos_token_id", "eos_token_id")
    cfg: dict[str, Any] = {k: target[k] for k in keys if k in target}
    cfg.update({"architectures": ["LlamaForCausalLMEagle3" if eagle3 else "LlamaForCausalLM"], "model_type": "llama",
                "hidden_act": "silu", "num_hidden_layers": 1, "tie_word_embeddings": False,
                "torch_dtype": str(dtype).removeprefix("torch.")})
    if eagle3:
        cfg["draft_vocab_size"] = draft_vocab_size or cfg["vocab_size"]
        if aux_layer_ids is not None:
            cfg["eagle_aux_hidden_state_layer_ids"] = aux_layer_ids
    else:
        cfg["bias"] = fc_bias
    cfg.update(overrides)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim

    def rand(*shape: int, scale: float = std) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def norm(dim: int) -> torch.Tensor:
        return (1.0 + torch.randn(dim, generator=g) * 0.1).to(dtype)

    p = "midlayer." if eagle3 else "layers.0."
    attn_in = 2 * hidden if eagle3 else hidden
    w: dict[str, torch.Tensor] = {
        "embed_tokens.weight": rand(vocab, hidden, scale=1.0),  # the target's copy in real heads; unused
        p + "self_attn.q_proj.weight": rand(q, attn_in),
        p + "self_attn.k_proj.weight": rand(kv, attn_in),
        p + "self_attn.v_proj.weight": rand(kv, attn_in),
        p + "self_attn.o_proj.weight": rand(hidden, q),
        p + "mlp.gate_proj.weight": rand(inter, hidden),
        p + "mlp.up_proj.weight": rand(inter, hidden),
        p + "mlp.down_proj.weight": rand(hidden, inter),
        p + "post_attention_layernorm.weight": norm(hidden),
    }
    if eagle3:
        draft_vocab = cfg["draft_vocab_size"]
        w["fc.weight"] = rand(hidden, 3 * cfg.get("target_hidden_size", hidden), scale=std / 2)
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "hidden_norm.weight"] = norm(hidden)
        w["norm.weight"] = norm(hidden)
        w["lm_head.weight"] = rand(draft_vocab, hidden)
        ids = torch.randperm(vocab, generator=g)[:draft_vocab].sort().values
        w["d2t"] = ids - torch.arange(draft_vocab)
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[ids] = True
        w["t2d"] = t2d
    else:
        w["fc.weight"] = rand(hidden, 2 * hidden)
        if fc_bias:
            w["fc.bias"] = rand(hidden)
    if torch_bin:
        torch.save(w, out / "pytorch_model.bin")
    else:
        save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
