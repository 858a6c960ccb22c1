"""A byte-level tokenizer of any vocabulary size, for tiny test and benchmark models.

Each byte is one token (ids 0-255, GPT-2's printable byte alphabet), then ChatML
special tokens, then reserved specials up to `vocab_size`. Multi-byte characters span
several tokens, which exercises streaming detokenization.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_alphabet() -> list[str]:
    """The printable stand-in character for each byte 0..255 (GPT-2 byte-level scheme):
    printable Latin-1 bytes stand for themselves, the rest map to code points from 256."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_byte_tokenizer(vocab_size: int) -> Tokenizer:
    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIALS)}")
    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    names = SPECIALS + [f"<|reserved_{i}|>" for i in range(vocab_size - 256 - len(SPECIALS))]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    return tok


def write_byte_tokenizer(out_dir: str | Path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json (ChatML template, eos <|im_end|>)."""
    out = Path(out_dir)
    build_byte_tokenizer(vocab_size).save(str(out / "tokenizer.json"))
    write_chatml_tokenizer_config(out, CHATML_TEMPLATE, 1 << 20)


def write_chatml_tokenizer_config(out_dir: str | Path, chat_template: str, model_max_length: int) -> None:
    """tokenizer_config.json of a ChatML-style tokenizer (eos <|im_end|>, pad
    <|endoftext|>, no BOS) with `chat_template`."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": chat_template,
        "model_max_length": model_max_length,
    }
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
