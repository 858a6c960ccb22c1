"""Real Qwen2.5-Coder weights (GGUF Q4_K_M, converted by bench/real_models.py) against HF.

These tests use only what is already in the bench cache (`$RTPLLM_CACHE_DIR/bench`,
default ~/.cache/rtpllm/bench) and skip, saying how to fill it, when it is empty: CI has
no network and nothing here downloads. Fill it with

    python bench/real_models.py qwen2.5-coder-0.5b
    python bench/real_models.py qwen2.5-coder-1.5b   # the 1.5B checks
    python bench/datasets.py                         # ShareGPT texts for the tokenizer check

The engine checks run only with RTPLLM_TEST_REAL_MODELS=1 (the suite stays short on a
machine whose cache happens to be full): the 0.5B engine-vs-HF check takes one to four
minutes on 2 CPU cores; the 1.5B one several minutes and ~15 GB of memory (two float32
copies), so it also needs RTPLLM_TEST_QWEN_1_5B=1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bench import datasets, real_models
from rtpllm import LLM, SamplingParams
from rtpllm.tokenizer.tokenizer import Tokenizer
from tests.unit import test_models_vs_hf
from tests.unit.test_models_vs_hf import check_against_hf

pytestmark = pytest.mark.slow

SMALL, LARGE = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"
ENGINE_ENV, LARGE_ENV = "RTPLLM_TEST_REAL_MODELS", "RTPLLM_TEST_QWEN_1_5B"
CHATS = [
    [{"role": "user", "content": "Write a python function that reverses a string."}],
    [{"role": "user", "content": "Fix the bug:\n```python\ndef add(a, b):\n    return a - b\n```"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Explain what a hash map is in two sentences."},
    ],
]
TEXTS = [
    "Hello world",
    "def f(x):\n    return x ** 2  # square\r\n\n\n\tend",
    "I'M here, you'LL see; we'd've 123456789 12.5% über café e\u0301 日本語 😀 مرحبا",
    "<|im_start|>user\n<tool_call>{\"a\": 1}</tool_call><|im_end|><|endoftext|>",
    "    indented    and   spaced   ",
]


def cached(name: str) -> Path:
    path = real_models.cached_model_dir(name)
    if path is None:
        pytest.skip(
            f"{name} is not in the bench cache ({real_models.bench_cache() / 'models'}); "
            f"run `python bench/real_models.py {name}` (needs network) to convert it"
        )
    return path


def hf_qwen2_tokenizer(model_dir: Path) -> Any:
    """HF's Qwen2Tokenizer over the converted vocabulary and merges, with Qwen's added
    tokens: the tokenizer class Qwen2.5's HF checkpoints load, built independently of our
    pre-tokenizer and normalizer."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    data = json.loads((model_dir / "tokenizer.json").read_text())
    added = data["added_tokens"]
    vocab = {t: i for t, i in data["model"]["vocab"].items() if i < min(a["id"] for a in added)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    for a in sorted(added, key=lambda a: a["id"]):
        tok.add_tokens([AddedToken(a["content"], special=a["special"], normalized=False)])
        assert tok.convert_tokens_to_ids(a["content"]) == a["id"]
    return tok


def sample_texts() -> list[str]:
    """Fixed tricky strings, plus ShareGPT turns when the dataset is cached."""
    texts = list(TEXTS)
    if (real_models.bench_cache() / "data" / Path(datasets.SHAREGPT_MEMBER).name).is_file():
        for conv in datasets.sharegpt_conversations(limit=300):
            texts.extend(t.text for t in conv.turns)
    return texts


@pytest.mark.parametrize("name", [SMALL, LARGE])
def test_config(name: str) -> None:
    cfg = json.loads((cached(name) / "config.json").read_text())
    hidden, layers, heads, inter = {SMALL: (896, 24, 14, 4864), LARGE: (1536, 28, 12, 8960)}[name]
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (hidden, layers, heads)
    assert (cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (inter, 2, 151936)
    assert cfg["rope_theta"] == 1000000.0 and cfg["rms_norm_eps"] == 1e-6
    # These GGUFs store output.weight apart from token_embd (in another quantization).
    assert cfg["tie_word_embeddings"] is False
    gen = json.loads((cached(name) / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]


def test_tokenizer_equals_hf_qwen2() -> None:
    from tokenizers import Tokenizer as HFTokenizer

    model_dir = cached(SMALL)
    ours = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
    hf = hf_qwen2_tokenizer(model_dir)
    assert ours.get_vocab() == hf.get_vocab() and len(hf) == 151665
    assert ours.encode("Hello world").ids == [9707, 1879]  # Qwen2's published ids
    texts = sample_texts()
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == hf.encode(text, add_special_tokens=False), text[:200]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_chat_ids_equal_hf() -> None:
    from transformers import AutoTokenizer

    model_dir = cached(SMALL)
    ours = Tokenizer.from_dir(model_dir)
    hf = AutoTokenizer.from_pretrained(model_dir)
    for chat in CHATS:
        expected = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert ours.encode_chat(chat) == list(expected["input_ids"])
    assert set(ours.eos_token_ids) == {151645, 151643}


def test_draft_and_target_share_the_tokenizer() -> None:
    """0.5B drafts for 1.5B in speculative decoding: token ids must mean the same."""
    small, large = cached(SMALL), cached(LARGE)
    assert (small / "tokenizer.json").read_bytes() == (large / "tokenizer.json").read_bytes()
    s_cfg = json.loads((small / "tokenizer_config.json").read_text())
    l_cfg = json.loads((large / "tokenizer_config.json").read_text())
    # The templates differ only in how the tools preamble escapes braces; chats without
    # tools render the same ids.
    assert {k: v for k, v in s_cfg.items() if k != "chat_template"} == {
        k: v for k, v in l_cfg.items() if k != "chat_template"
    }
    s_tok, l_tok = Tokenizer.from_dir(small), Tokenizer.from_dir(large)
    for chat in CHATS:
        assert s_tok.encode_chat(chat) == l_tok.encode_chat(chat)
    for name in ("config.json", "generation_config.json"):
        s, l_ = json.loads((small / name).read_text()), json.loads((large / name).read_text())
        for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            assert s.get(key) == l_.get(key), (name, key)


def engine(name: str) -> LLM:
    # 64-token steps split every prompt into prefill chunks.
    return LLM(str(cached(name)), device="cpu", max_model_len=2048, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def small_llm() -> LLM:
    if os.environ.get(ENGINE_ENV) != "1":
        pytest.skip(f"one to four minutes on 2 cores; set {ENGINE_ENV}=1")
    return engine(SMALL)


def parity(name: str, llm: LLM) -> dict[str, int]:
    tok = llm.get_tokenizer()
    assert tok is not None
    prompts = [tok.encode_chat(chat) for chat in CHATS] + [tok.encode("def quicksort(arr):")]
    # Computing the first chat once beforehand puts its blocks in the prefix cache: the
    # checked run then takes them (and the first two chats share Qwen's default system
    # prompt) instead of computing them.
    llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=1))
    hits_before = llm.engine.block_manager.stats.hit_tokens
    try:
        figures = check_against_hf(cached(name), llm, prompts, max_tokens=24)
    finally:
        test_models_vs_hf._HF_CACHE.clear()  # a float32 HF copy of the model
    figures["prefix_hit_tokens"] = llm.engine.block_manager.stats.hit_tokens - hits_before
    assert figures["prefix_hit_tokens"] >= 32
    return figures


def test_engine_matches_hf_small(small_llm: LLM) -> None:
    print(f"{SMALL}: {parity(SMALL, small_llm)}")


@pytest.mark.skipif(
    os.environ.get(ENGINE_ENV) != "1" or os.environ.get(LARGE_ENV) != "1",
    reason=f"several minutes and ~15 GB; set {ENGINE_ENV}=1 and {LARGE_ENV}=1",
)
def test_engine_matches_hf_large() -> None:
    print(f"{LARGE}: {parity(LARGE, engine(LARGE))}")


def test_greedy_answer_is_code(small_llm: LLM) -> None:
    """The dequantized weights are the model, not noise: it answers with Python."""
    out = small_llm.chat(CHATS[0], SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    assert "def reverse" in out.text, out.text
