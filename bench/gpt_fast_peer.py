"""gpt-fast (pytorch-labs) as a peer for batch-1 decode, run in the same call as ours.

gpt-fast is not part of this project and nothing of it is copied here: the bench takes a
checkout of it from `--gpt-fast DIR` (the lent GPU machine has no network, so carry one
in the git-ignored `.whl/gpt-fast/`), imports its `model.py` and `generate.py`, and runs
them as its own `generate.py --compile` does: `decode_one_token` compiled with
mode="reduce-overhead" (CUDA graphs) and fullgraph, its own static KV cache, its default
sampling (temperature 0.8, top-k 200).

Weights are random (bf16, N(0, 0.02)), the shape is gpt-fast's `llama-3.1-8b` entry,
which is the Llama-3.1-8B shape our `bench/engine.py latency` builds. Two rates:

- `tok_per_s`: gpt-fast's own figure, new tokens / wall time of `generate` (prefill
  included, as its script prints it);
- `decode_tok_per_s`: prefill excluded, the way `bench/engine.py latency` quotes ours:
  (256 - 2) / (time(256 new tokens) - time(2 new tokens)).

Usage: python bench/gpt_fast_peer.py --gpt-fast .whl/gpt-fast [--out gpt_fast.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch


def _load_gpt_fast(root: Path) -> tuple[types.ModuleType, types.ModuleType]:
    sys.path.insert(0, str(root))
    # generate.py imports its tokenizer module (sentencepiece, tiktoken) for the CLI only.
    sys.modules.setdefault("tokenizer", types.SimpleNamespace(get_tokenizer=None))  # type: ignore[arg-type]
    if not hasattr(torch.backends.cuda, "sdp_kernel"):
        # Older gpt-fast asks for the math SDPA backend through the API that newer
        # PyTorch removed; the replacement takes the same choice.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        @contextlib.contextmanager
        def sdp_kernel(enable_flash: bool = True, enable_mem_efficient: bool = True, enable_math: bool = True):
            backends = [b for b, on in ((SDPBackend.FLASH_ATTENTION, enable_flash), (SDPBackend.EFFICIENT_ATTENTION, enable_mem_efficient), (SDPBackend.MATH, enable_math)) if on]
            with sdpa_kernel(backends):
                yield

        torch.backends.cuda.sdp_kernel = sdp_kernel  # type: ignore[attr-defined]
    import generate as gf_generate  # type: ignore[import-not-found]
    import model as gf_model  # type: ignore[import-not-found]

    return gf_generate, gf_model


def _random_model(gf_model: types.ModuleType, name: str) -> torch.nn.Module:
    with torch.device("meta"):
        model = gf_model.Transformer.from_name(name)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # the RMSNorm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpt-fast", type=Path, required=True, help="a gpt-fast checkout (model.py, generate.py)")
    ap.add_argument("--name", default="llama-3.1-8b", help="gpt-fast's transformer_configs entry")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpt_fast_peer: needs CUDA", file=sys.stderr)
        return 2

    gf, gf_model = _load_gpt_fast(args.gpt_fast.resolve())
    model = _random_model(gf_model, args.name)
    gf.decode_one_token = torch.compile(gf.decode_one_token, mode="reduce-overhead", fullgraph=True)
    prompt = torch.randint(0, 1024, (args.prompt_len,), device="cuda", dtype=torch.int64)
    sampling = {"temperature": 0.8, "top_k": 200}

    def timed(new_tokens: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            gf.generate(model, prompt, new_tokens, batch_size=1, interactive=False, draft_model=None, **sampling)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    timed(args.new_tokens)  # compiles and captures
    compile_s = time.perf_counter() - t0
    timed(2)  # (its generate needs one decode step at least)
    full = sorted(timed(args.new_tokens) for _ in range(args.repeats))[args.repeats // 2]
    short = sorted(timed(2) for _ in range(args.repeats))[args.repeats // 2]
    res: dict[str, Any] = {
        "peer": "gpt-fast",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "name": args.name,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "tok_per_s": args.new_tokens / full,
        "decode_tok_per_s": (args.new_tokens - 2) / (full - short),
        "compile_s": compile_s,
    }
    print(json.dumps(res))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    print(f"gpt-fast {args.name}: {res['tok_per_s']:.1f} tok/s (its own figure), {res['decode_tok_per_s']:.1f} decode tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
