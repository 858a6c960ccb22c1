"""GGUF -> HF conversion of the qwen2 architecture with k-quant weights, offline.

A tiny random Qwen2 is written as a GGUF the way llama.cpp lays out Qwen2.5-Coder's
Q4_K_M files: q/k/v biases in F32, q/k rows in HF order (llama.cpp permutes them only for
llama), an untied LM head, weights in Q4_K / Q5_K / Q6_K blocks (random block bytes with
sane fp16 scales, since `gguf` cannot quantize k-quants) and Q8_0 / Q5_0 (quantized by
`gguf`), a vocabulary padded with unused tokens, and the qwen2 pre-tokenizer. The
converted directory must hold exactly the dequantized weights, give the reference model's
logits in HF, run in the engine token for token as HF does, and tokenize as HF's
Qwen2Tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file

from rtpllm import LLM
from rtpllm.loader.gguf_convert import convert_gguf
from tests.unit.test_models_vs_hf import check_against_hf

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2  # k-quant rows need multiples of 256
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ in"]
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<tool_call>"]
UNUSED = ["[PAD0]", "[PAD1]", "[PAD2]"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# Which quantization each weight gets (the mix of the real Q4_K_M files).
QTYPES = {
    "token_embd": Q.Q4_K,
    "output": Q.Q6_K,
    "attn_q": Q.Q4_K,
    "attn_k": Q.Q5_K,
    "attn_v": Q.Q8_0,
    "attn_output": Q.Q5_0,
    "ffn_gate": Q.Q4_K,
    "ffn_up": Q.Q5_K,
    "ffn_down": Q.Q6_K,
}
HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TEXTS = [
    "the thin inn",
    "Hello, world! It's 2024.\n\n  indented\r\n\ttab",
    "I'M here, you'LL see; we'd've 123456789 12.5%",
    "e\u0301 caf\u00e9 \u65e5\u672c\u8a9e \U0001f600 \u0645\u0631\u062d\u0628\u0627",  # NFC, CJK, emoji, Arabic
    "<|im_start|>user\nthe <tool_call>x</tool_call><|im_end|>",
    "   leading and trailing   ",
]


def tokens() -> list[str]:
    from tokenizers import pre_tokenizers

    normal = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "he", "Ġthe", "in", "Ġin"]
    # Qwen's order: the BPE vocabulary, then special tokens, then padding rows.
    return [*normal, *CONTROL, *USER_DEFINED, *UNUSED]


def token_types() -> list[int]:
    kind = {**{t: 3 for t in CONTROL}, **{t: 4 for t in USER_DEFINED}, **{t: 5 for t in UNUSED}}
    return [kind.get(t, 1) for t in tokens()]


def random_kquant(rng: np.random.Generator, rows: int, cols: int, qtype: Q) -> np.ndarray:
    """Random block bytes of a k-quant type with small positive fp16 super-block scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_elems * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(-1, block_bytes)

    def f16(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, size=len(blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)

    if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin, scales[12], (qh[32],) qs[128]
        blocks[:, 0:2] = f16(1e-4, 4e-4)
        blocks[:, 2:4] = f16(1e-4, 4e-4)
    elif qtype == Q.Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        blocks[:, 208:210] = f16(1e-4, 4e-4)
    else:
        raise AssertionError(qtype)
    return raw


def quantized(rng: np.random.Generator, shape: tuple[int, int], qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(GGUF block bytes, the float32 weight they dequantize to)."""
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        raw = random_kquant(rng, *shape, qtype)
    else:
        raw = quantize(rng.normal(0, 0.05, size=shape).astype(np.float32), qtype)
    return raw, dequantize(raw, qtype).reshape(shape).astype(np.float32)


def write_qwen2_gguf(path: Path, *, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes the GGUF; returns the HF state dict it encodes (the truth to compare with)."""
    rng = np.random.default_rng(seed)
    vocab = len(tokens())
    truth: dict[str, np.ndarray] = {}
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(LAYERS)
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens())
    w.add_token_types(token_types())
    w.add_token_merges(MERGES)
    w.add_eos_token_id(tokens().index("<|im_end|>"))
    w.add_pad_token_id(tokens().index("<|endoftext|>"))
    w.add_bos_token_id(tokens().index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    def add_quant(gguf_name: str, hf_name: str, shape: tuple[int, int]) -> None:
        qtype = QTYPES[gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]]
        raw, values = quantized(rng, shape, qtype)
        w.add_tensor(gguf_name, raw, raw_dtype=qtype)
        truth[hf_name] = values

    def add_f32(gguf_name: str, hf_name: str, values: np.ndarray) -> None:
        w.add_tensor(gguf_name, values.astype(np.float32))
        truth[hf_name] = values.astype(np.float32)

    add_quant("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN))
    if not tied:
        add_quant("output.weight", "lm_head.weight", (vocab, HIDDEN))
    add_f32("output_norm.weight", "model.norm.weight", rng.uniform(0.5, 1.5, HIDDEN))
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        add_f32(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", rng.uniform(0.5, 1.5, HIDDEN))
        add_f32(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", rng.uniform(0.5, 1.5, HIDDEN))
        out_rows = {"attn_q": HIDDEN, "attn_k": KV_HEADS * head_dim, "attn_v": KV_HEADS * head_dim}
        for part, rows in out_rows.items():
            add_quant(f"blk.{i}.{part}.weight", p + HF_NAMES[part] + ".weight", (rows, HIDDEN))
            add_f32(f"blk.{i}.{part}.bias", p + HF_NAMES[part] + ".bias", rng.normal(0, 0.1, rows))
        add_quant(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN))
        add_quant(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", (INTER, HIDDEN))
        add_quant(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", (INTER, HIDDEN))
        add_quant(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", (HIDDEN, INTER))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return truth


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, bool]:
    tied: bool = request.param
    root = tmp_path_factory.mktemp("qwen2-gguf")
    truth = write_qwen2_gguf(root / "tiny-qwen2.gguf", tied=tied)
    out = convert_gguf(root / "tiny-qwen2.gguf", root / "model")
    return out, truth, tied


def reference_model(truth: dict[str, np.ndarray], tied: bool) -> torch.nn.Module:
    """HF Qwen2 built independently of the converter's config.json, holding the truth."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tokens()),
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=tied,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in truth.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def test_weights_are_the_dequantized_blocks(converted: tuple[Path, dict, bool]) -> None:
    out, truth, tied = converted
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(truth)
    assert ("lm_head.weight" in weights) is not tied
    for name, value in truth.items():
        assert weights[name].dtype == np.float32
        # Exact: no q/k row permutation for qwen2, biases untouched, blocks dequantized as is.
        assert np.array_equal(weights[name], value), name


def test_config_and_generation_config(converted: tuple[Path, dict, bool]) -> None:
    out, _, tied = converted
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert cfg["tie_word_embeddings"] is tied
    assert cfg["rope_theta"] == 1000000.0 and cfg["rms_norm_eps"] == 1e-6
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (HEADS, KV_HEADS, 64)
    assert cfg["vocab_size"] == len(tokens()) and cfg["use_sliding_window"] is False
    assert "attention_bias" not in cfg  # Qwen2 always has q/k/v biases
    gen = json.loads((out / "generation_config.json").read_text())
    # <|im_end|> ends a turn; <|endoftext|> ends generation too, as in Qwen's generation_config.
    assert gen["eos_token_id"] == [tokens().index("<|im_end|>"), tokens().index("<|endoftext|>")]
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == TEMPLATE and tcfg["eos_token"] == "<|im_end|>"
    assert tcfg["add_bos_token"] is False


def test_hf_logits_equal_reference(converted: tuple[Path, dict, bool]) -> None:
    from transformers import AutoModelForCausalLM

    out, truth, tied = converted
    ref = reference_model(truth, tied)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 70, 100, 200, 9, 33, 250, 4, 261]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_engine_matches_hf(converted: tuple[Path, dict, bool]) -> None:
    out, _, _ = converted
    llm = LLM(str(out), device="cpu", max_num_batched_tokens=24)  # forces chunked prefill
    check_against_hf(out, llm, [[5, 17, 42, 99, 7], list(range(30, 67)), [261, 3]], max_tokens=16)


def hf_qwen2_tokenizer() -> object:
    """HF's own Qwen2Tokenizer over the same vocabulary, merges and special tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    normal = {t: i for i, (t, ty) in enumerate(zip(tokens(), token_types(), strict=True)) if ty == 1}
    tok = Qwen2Tokenizer(vocab=normal, merges=[tuple(m.split(" ")) for m in MERGES])
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_DEFINED])
    assert [tok.convert_tokens_to_ids(t) for t in CONTROL + USER_DEFINED] == [
        tokens().index(t) for t in CONTROL + USER_DEFINED
    ]
    return tok


def test_tokenizer_equals_hf_qwen2(converted: tuple[Path, dict, bool]) -> None:
    from tokenizers import Tokenizer

    out, _, _ = converted
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf = hf_qwen2_tokenizer()
    hf_backend = hf.backend_tokenizer  # type: ignore[attr-defined]
    for text in TEXTS:
        assert ours.pre_tokenizer.pre_tokenize_str(text) == hf_backend.pre_tokenizer.pre_tokenize_str(text), text
        assert ours.normalizer.normalize_str(text) == hf_backend.normalizer.normalize_str(text)
        ids = ours.encode(text).ids
        assert ids == hf.encode(text, add_special_tokens=False), text  # type: ignore[attr-defined]
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)  # type: ignore[attr-defined]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
    vocab = ours.get_vocab()
    assert not set(UNUSED) & set(vocab)  # padding rows are not tokens
    assert vocab == hf.get_vocab()  # type: ignore[attr-defined]
    assert ours.encode("the thin inn").tokens == ["t", "he", "Ġt", "h", "in", "Ġin", "n"]
    assert ours.encode("e\u0301").ids == ours.encode("\u00e9").ids  # NFC first, as HF's


def test_rtpllm_tokenizer_chat(converted: tuple[Path, dict, bool]) -> None:
    from rtpllm.tokenizer.tokenizer import Tokenizer

    out, _, _ = converted
    tok = Tokenizer.from_dir(out)
    ids = tok.encode_chat([{"role": "user", "content": "the thin inn"}])
    assert ids[0] == tokens().index("<|im_start|>") and tokens().index("<|im_end|>") in ids
    assert set(tok.eos_token_ids) == {tokens().index("<|im_end|>"), tokens().index("<|endoftext|>")}
    assert tok.is_special(tokens().index("<|im_start|>")) and not tok.is_special(tokens().index("<tool_call>"))
