"""Convert a llama-architecture GGUF file into an HF-format model directory.

The engine loads HF-format checkpoints only, so a GGUF model (such as the embedded
SmolLM2-135M-Instruct, shipped quantized to Q4_1) is converted once: weights are
dequantized to float32 safetensors with HF tensor names, and the tokenizer, chat template
and generation settings are rebuilt from the GGUF metadata.

Weights are stored as float32 on purpose: the dequantized values (`d * q + m` with fp16
`d`/`m`) are exactly representable in float32 but not in bfloat16 or float16, so float32
adds no error on top of the quantization. The serving path casts to its own dtype on load,
and for a 135M-parameter model the cost is ~540 MB on disk instead of ~270 MB.

The directory is written atomically: everything goes into a temporary sibling directory
that is renamed into place only when complete, so a crashed conversion never leaves a
directory that later looks valid.

Run it as `python -m rtpllm.loader.gguf_convert [GGUF_PATH] OUT_DIR`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

log = logging.getLogger(__name__)

# Bump when the output changes in a way that should make caches reconvert.
CONVERTER_VERSION = 1
# Written last into every converted directory; says where it came from and how.
CONVERSION_MARKER = "rtpllm_conversion.json"

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_TOKEN_NORMAL = 1
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Per-layer GGUF tensor names -> HF LlamaForCausalLM names (inside `model.layers.N.`).
_LAYER_TENSORS: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_NAME = re.compile(r"^([a-z_]+)\.(weight|bias)$")


class GGUFConversionError(ValueError):
    """A GGUF file this converter cannot turn into an HF-format directory."""


class _Metadata:
    """Typed access to a GGUF file's key/value metadata."""

    _MISSING: Any = object()

    def __init__(self, reader: GGUFReader) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self._fields.get(key)
        if field is None:
            if default is self._MISSING:
                raise GGUFConversionError(f"GGUF metadata has no {key!r}")
            return default
        return field.contents()


# ---------------------------------------------------------------------------- weights


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q_proj/k_proj weight (or bias).

    HF Llama applies RoPE in "rotate-half" form: within a head of size d, row i pairs with
    row i + d/2. llama.cpp rotates adjacent pairs (2i, 2i+1), so its HF->GGUF converter
    reorders each head's rows to [r0, r_{d/2}, r1, r_{d/2+1}, ...]. Here GGUF row 2i+j goes
    back to HF row j*d/2 + i.
    """
    rows = weight.shape[0]
    if rows % num_heads or (rows // num_heads) % 2:
        raise GGUFConversionError(f"cannot split {rows} rows into {num_heads} heads of even size")
    head_dim = rows // num_heads
    per_head = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(weight.shape))


def _hf_tensor_name(gguf_name: str) -> str:
    match = _LAYER_NAME.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{kind}"
    else:
        match = _GLOBAL_NAME.match(gguf_name)
        if match and match.group(1) in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[match.group(1)]}.{match.group(2)}"
    # Refuse rather than drop: an unknown tensor (e.g. llama3 `rope_freqs`) changes the math.
    raise GGUFConversionError(f"GGUF tensor {gguf_name!r} has no HF Llama equivalent")


def _convert_tensors(reader: GGUFReader, num_heads: int, num_kv_heads: int) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = _hf_tensor_name(t.name)
        # GGUF lists dims fastest-first (ne0 = columns); numpy/HF order is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        # np.asarray drops the memmap subclass, whose per-slice bookkeeping dominates dequantize.
        values = np.asarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32).reshape(shape)
        if ".self_attn.q_proj." in name:
            values = unpermute_rope_rows(values, num_heads)
        elif ".self_attn.k_proj." in name:
            values = unpermute_rope_rows(values, num_kv_heads)
        tensors[name] = np.ascontiguousarray(values)
    return tensors


# ----------------------------------------------------------------------------- config


def _f32(value: float) -> float:
    # GGUF stores floats as float32 (1e-5 reads back as 9.999999747e-06); keep the short
    # decimal the checkpoint was written with.
    return float(str(np.float32(value)))


def _build_config(meta: _Metadata, tensor_names: set[str]) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFConversionError(f"unsupported GGUF architecture {arch!r}; only 'llama' is converted")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise GGUFConversionError(f"GGUF rope scaling {scaling!r} is not supported by this converter")

    hidden = int(meta.get(f"{arch}.embedding_length"))
    num_heads = int(meta.get(f"{arch}.attention.head_count"))
    num_kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", num_heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // num_heads))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFConversionError(f"partial rotary ({rope_dim} of {head_dim} dims) is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = int(meta.get(f"{arch}.vocab_size", len(tokens)))
    bos = meta.get("tokenizer.ggml.bos_token_id", None)
    eos = meta.get("tokenizer.ggml.eos_token_id", None)
    pad = meta.get("tokenizer.ggml.padding_token_id", None)

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(meta.get(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.get(f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get(f"{arch}.context_length")),
        "rms_norm_eps": _f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        # llama.cpp omits output.weight when the LM head shares the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    return config


# -------------------------------------------------------------------------- tokenizer

# `tokenizer.ggml.pre` -> the HF pre-tokenizer that splits text the same way. "smollm"
# isolates every digit before the GPT-2 byte-level regex; "gpt-2" is the regex alone.
_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}


def _build_tokenizer(meta: _Metadata) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFConversionError(f"unsupported GGUF tokenizer model {model!r}; only byte-level BPE (gpt2)")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFConversionError(
            f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(_PRE_TOKENIZERS)}"
        )
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens"))
    types: list[int] = list(meta.get("tokenizer.ggml.token_type", [_TOKEN_NORMAL] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFConversionError("GGUF token list has duplicate entries")
    # Byte-level tokens never contain a literal space (it is mapped to 'Ġ'), so one space
    # separates the two halves of each merge.
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    # Only affects offsets; matches what HF byte-level tokenizers ship with.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (<|im_start|> ...) must be matched whole before BPE and be skippable on
    # decode; user-defined ones are matched whole but decoded like text. Adding a token that
    # is already in the vocab keeps its id.
    added = [
        AddedToken(t, special=ty == _TOKEN_CONTROL, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    tok.add_tokens(added)
    return tok


def _tokenizer_config(meta: _Metadata, config: dict[str, Any]) -> dict[str, Any]:
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens"))

    def token(key: str) -> str | None:
        idx = meta.get(key, None)
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template", None),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }


# ---------------------------------------------------------------------------- writing


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _fsync_tree(root: Path) -> None:
    # Flush file contents before the rename publishes the directory, so that after a
    # power loss a published directory is not full of empty files.
    for path in root.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    if not out.exists():
        try:
            os.rename(tmp, out)
        except OSError as exc:  # someone else published first
            raise FileExistsError(f"{out} appeared while converting; not replacing it") from exc
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    # Move the old directory aside first: rename cannot replace a non-empty directory.
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, trash / out.name)
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a llama-architecture GGUF file into an HF-format directory at `out_dir`.

    Writes config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json
    (with the chat template), generation_config.json and a conversion marker. The directory
    appears atomically; an existing `out_dir` raises FileExistsError unless `overwrite`.
    Returns the absolute output path.
    """
    src = Path(gguf_path)
    out = Path(out_dir).expanduser().absolute()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    start = time.perf_counter()
    reader = GGUFReader(src)
    meta = _Metadata(reader)
    tensor_names = {t.name for t in reader.tensors}
    config = _build_config(meta, tensor_names)
    tokenizer = _build_tokenizer(meta)
    tensors = _convert_tensors(reader, config["num_attention_heads"], config["num_key_value_heads"])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        _write_json(tmp / "config.json", config)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(meta, config))
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        _write_json(tmp / "generation_config.json", generation)
        _write_json(
            tmp / CONVERSION_MARKER,
            {
                "converter_version": CONVERTER_VERSION,
                "source": src.name,
                "source_bytes": src.stat().st_size,
                "dtype": "float32",
            },
        )
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors creates its file owner-only
        _fsync_tree(tmp)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s -> %s in %.1fs", src, out, time.perf_counter() - start)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `convert-gguf [GGUF_PATH] OUT_DIR` (default: the embedded SmolLM2 GGUF)."""
    parser = argparse.ArgumentParser(
        prog="rtpllm convert-gguf",
        description="Convert a llama-architecture GGUF file to an HF-format model directory.",
    )
    parser.add_argument(
        "gguf_path", nargs="?", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.gguf_path is None:
            # Imported here: the registry imports this module.
            from rtpllm.models.registry import DEFAULT_MODEL, KNOWN_MODELS

            gguf_path = KNOWN_MODELS[DEFAULT_MODEL].gguf_path()
        else:
            gguf_path = Path(args.gguf_path)
        out = convert_gguf(gguf_path, args.out_dir, overwrite=args.overwrite)
    except (GGUFConversionError, FileExistsError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
