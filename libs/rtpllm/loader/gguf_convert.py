"""Convert a llama- or qwen2-architecture GGUF file into an HF-format model directory.

The engine loads HF-format checkpoints only, so a GGUF model (such as the embedded
SmolLM2-135M-Instruct, shipped quantized to Q4_1, or Qwen2.5-Coder in Q4_K_M) is converted
once: weights are dequantized (`gguf.quants.dequantize`: legacy Q4_0..Q8_0 blocks and the
k-quants Q2_K..Q6_K alike) to float32 safetensors with HF tensor names, and the tokenizer,
chat template and generation settings are rebuilt from the GGUF metadata.

Weights are stored as float32 on purpose: the dequantized values (`d * q + m` with fp16
`d`/`m`, and the k-quants' 6-bit sub-block scales times an fp16 super-block scale) are
exactly representable in float32 but not in bfloat16 or float16, so float32 adds no error
on top of the quantization. The serving path casts to its own dtype on load; the cost is
disk (4 bytes a parameter: ~540 MB for SmolLM2-135M, ~6.2 GB for Qwen2.5-Coder-1.5B).
The safetensors file is written one tensor at a time, so converting needs memory for one
dequantized tensor, not for the whole model.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

log = logging.getLogger(__name__)

# Bump when the output changes in a way that should make caches reconvert.
CONVERTER_VERSION = 1
# Written last into every converted directory; says where it came from and how.
CONVERSION_MARKER = "rtpllm_conversion.json"

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_TOKEN_NORMAL = 1
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4
_TOKEN_UNUSED = 5  # padding rows of an embedding larger than the vocabulary ([PAD151665] ...)


@dataclass(frozen=True)
class _Architecture:
    """What differs between the GGUF architectures this converter handles."""

    hf_class: str
    model_type: str
    # llama.cpp permutes q/k rows only for the llama family (its LlamaModel converter);
    # Qwen2 checkpoints keep HF's rotate-half row order.
    rope_permuted: bool
    # Control tokens that end generation besides `eos_token_id`; Qwen's HF
    # generation_config lists <|endoftext|> with <|im_end|>, and llama.cpp treats both as
    # end of generation.
    extra_eos: tuple[str, ...] = ()


_ARCHITECTURES: dict[str, _Architecture] = {
    "llama": _Architecture("LlamaForCausalLM", "llama", rope_permuted=True),
    "qwen2": _Architecture("Qwen2ForCausalLM", "qwen2", rope_permuted=False, extra_eos=("<|endoftext|>",)),
}

# Per-layer GGUF tensor names -> HF names (inside `model.layers.N.`); Llama and Qwen2 share
# them, Qwen2 adding `.bias` to attn_q/k/v.
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
    raise GGUFConversionError(f"GGUF tensor {gguf_name!r} has no HF Llama/Qwen2 equivalent")


@dataclass(frozen=True)
class _PlannedTensor:
    """One output tensor: its HF name and shape, and the GGUF tensor it comes from."""

    name: str
    shape: tuple[int, ...]
    source: ReaderTensor
    rope_heads: int | None  # heads to unpermute q/k rows over; None: leave rows as they are


def _plan_tensors(reader: GGUFReader, arch: _Architecture, config: dict[str, Any]) -> list[_PlannedTensor]:
    plan: list[_PlannedTensor] = []
    for t in reader.tensors:
        name = _hf_tensor_name(t.name)
        # GGUF lists dims fastest-first (ne0 = columns); numpy/HF order is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        heads = None
        if arch.rope_permuted and ".self_attn.q_proj." in name:
            heads = config["num_attention_heads"]
        elif arch.rope_permuted and ".self_attn.k_proj." in name:
            heads = config["num_key_value_heads"]
        plan.append(_PlannedTensor(name, shape, t, heads))
    return sorted(plan, key=lambda p: p.name)


def _dequantize(planned: _PlannedTensor) -> np.ndarray:
    t = planned.source
    # np.asarray drops the memmap subclass, whose per-slice bookkeeping dominates dequantize.
    values = np.asarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32).reshape(planned.shape)
    if planned.rope_heads is not None:
        values = unpermute_rope_rows(values, planned.rope_heads)
    return np.ascontiguousarray(values)


def _write_safetensors(path: Path, plan: Sequence[_PlannedTensor], metadata: dict[str, str]) -> None:
    """Write float32 tensors to a safetensors file, dequantizing one tensor at a time.

    `safetensors.numpy.save_file` needs every tensor in memory and copies each to bytes,
    ~2x the float32 model at peak (12 GB for a 1.5B model); the header only needs shapes,
    so it is written first and the data streamed after it.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for p in plan:
        nbytes = 4 * int(np.prod(p.shape, dtype=np.int64))
        header[p.name] = {"dtype": "F32", "shape": list(p.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so the data starts 8-aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for p in plan:
            values = _dequantize(p)
            if values.size * 4 != header[p.name]["data_offsets"][1] - header[p.name]["data_offsets"][0]:
                raise GGUFConversionError(f"{p.source.name}: dequantized to {values.shape}, expected {p.shape}")
            f.write(values.astype("<f4", copy=False).tobytes())


# ----------------------------------------------------------------------------- config


def _f32(value: float) -> float:
    # GGUF stores floats as float32 (1e-5 reads back as 9.999999747e-06); keep the short
    # decimal the checkpoint was written with.
    return float(str(np.float32(value)))


def _architecture(meta: _Metadata) -> tuple[str, _Architecture]:
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise GGUFConversionError(
            f"unsupported GGUF architecture {arch!r}; converted: {', '.join(_ARCHITECTURES)}"
        )
    return arch, _ARCHITECTURES[arch]


def _build_config(meta: _Metadata, tensor_names: set[str]) -> dict[str, Any]:
    arch, family = _architecture(meta)
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
        "architectures": [family.hf_class],
        "model_type": family.model_type,
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
    if family.model_type == "qwen2":
        # Qwen2 always has q/k/v biases and no others (Qwen2Config has no bias switches).
        del config["attention_bias"], config["mlp_bias"]
        # Qwen configs carry a window that is off unless use_sliding_window; GGUF has none.
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=config["num_hidden_layers"])
    return config


def _generation_config(meta: _Metadata, config: dict[str, Any]) -> dict[str, Any]:
    _, family = _architecture(meta)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens"))
    eos = [config["eos_token_id"]] if config["eos_token_id"] is not None else []
    eos += [tokens.index(t) for t in family.extra_eos if t in tokens and tokens.index(t) not in eos]
    if len(eos) > 1:
        generation["eos_token_id"] = eos
    return generation


# -------------------------------------------------------------------------- tokenizer

# Qwen2's pre-tokenizer split (as in HF's Qwen2Tokenizer): GPT-4-style, one digit per piece,
# letters with at most one leading non-letter, and runs of newlines kept together.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> the HF pre-tokenizer that splits text the same way. "smollm"
# isolates every digit before the GPT-2 byte-level regex; "gpt-2" is the regex alone;
# "qwen2" is its own regex, then byte-level mapping without the GPT-2 regex.
_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "qwen2": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
}
# Normalizers that go with a pre-tokenizer: Qwen2 composes text to NFC first, as HF's does.
_NORMALIZERS = {"qwen2": normalizers.NFC}


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
    # Unused entries only pad the token list to the embedding's row count (Qwen2: 151665
    # tokens, 151936 rows); HF's tokenizer has no such tokens, so neither does ours.
    kept = [(i, tok) for i, (tok, ty) in enumerate(zip(tokens, types, strict=True)) if ty != _TOKEN_UNUSED]
    vocab = {tok: i for i, tok in kept}
    if len(vocab) != len(kept):
        raise GGUFConversionError("GGUF token list has duplicate entries")
    # Byte-level tokens never contain a literal space (it is mapped to 'Ġ'), so one space
    # separates the two halves of each merge.
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre in _NORMALIZERS:
        tok.normalizer = _NORMALIZERS[pre]()
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
    """Convert a llama- or qwen2-architecture GGUF file into an HF-format directory at `out_dir`.

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
    plan = _plan_tensors(reader, _architecture(meta)[1], config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        _write_json(tmp / "config.json", config)
        _write_safetensors(tmp / "model.safetensors", plan, metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(meta, config))
        _write_json(tmp / "generation_config.json", _generation_config(meta, config))
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
            path.chmod(0o644)  # readable by the serving user whatever the umask
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
        description="Convert a llama- or qwen2-architecture GGUF file to an HF-format model directory.",
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
