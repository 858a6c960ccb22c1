"""Structured outputs: validity on generated JSON schemas, and the throughput cost.

    python bench/structured_outputs.py                      # SmolLM2 on this machine
    python bench/structured_outputs.py --schemas 100 --streams 64 --out result.json
    python bench/structured_outputs.py --shape llama8b --tokenizer-from DIR --skip-validity  # GPU

1. Validity: `--schemas` random JSON schemas (tests/structured_schemas.py: nested
   objects, arrays, enums, required fields, bounded strings and numbers), one request
   each, all in one batch, at temperature 1 with guided JSON. Every output must parse
   and validate with `jsonschema`; the figures are how many did, and why any did not.
2. Overhead: `--streams` concurrent requests, each with its own schema (short prompts,
   so decoding dominates), then the same prompts unconstrained, each forced
   (ignore_eos, max_tokens) to the length its constrained run produced; the prefix
   cache is emptied before every run. Both runs do the same steps over the same batch shapes, so
   the ratio of their output tok/s is the cost of the grammar: mask computation (on a
   worker thread, overlapped with the forward pass), mask application on the device,
   and advancing the matchers.

`--shape llama8b` runs the overhead part on random weights of Llama-3.1-8B's shape
(load_format "dummy") with the tokenizer of `--tokenizer-from` (a model directory):
random weights write nonsense, but within the grammar, so the cost is measured at the
size that matters on a GPU. The model's 128256 logits are wider than a 49k tokenizer:
the padding rows are masked too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.structured_schemas

from rtpllm import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from rtpllm.loader.random_checkpoint import LLAMA_3_1_8B_SHAPE, make_config  # noqa: E402
from rtpllm.models.registry import resolve_model  # noqa: E402
from tests.structured_schemas import schemas  # noqa: E402


def prompt_for(schema: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"Give me a JSON object that follows this schema:\n{json.dumps(schema)}"}
    ]


def check_outputs(llm: LLM, items: list[dict[str, Any]], max_tokens: int, seed: int) -> dict[str, Any]:
    """Generate one output per schema (one batch); count how many parse and validate."""
    params = [
        SamplingParams(
            temperature=1.0,
            seed=seed + i,
            max_tokens=max_tokens,
            structured_outputs=StructuredOutputsParams(json=s),
        )
        for i, s in enumerate(items)
    ]
    start = time.perf_counter()
    outs = llm.chat([prompt_for(s) for s in items], params)
    elapsed = time.perf_counter() - start
    valid = 0
    failures: list[dict[str, Any]] = []
    for i, (schema, out) in enumerate(zip(items, outs, strict=True)):
        completion = out.outputs[0]
        try:
            jsonschema.validate(json.loads(completion.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append(
                {
                    "schema": i,
                    "finish_reason": completion.finish_reason,
                    "error": str(exc)[:200],
                    "text": completion.text[:300],
                }
            )
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "schemas": len(items),
        "valid": valid,
        "output_tokens": tokens,
        "seconds": elapsed,
        "failures": failures,
    }


def _timed(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, list]:
    # An empty prefix cache for every run: the prompts of an earlier run must not turn
    # the next one's prefill into cache hits.
    llm.engine.block_manager.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, outs


def overhead(
    llm: LLM, items: list[dict[str, Any]], max_tokens: int, seed: int, repeat: int = 1
) -> dict[str, Any]:
    """Output tok/s of constrained streams vs the same work unconstrained; with
    `repeat`, the runs alternate and each side's fastest counts (the least disturbed
    by anything else on the machine)."""
    tok = llm.get_tokenizer()
    assert tok is not None
    # A short prompt without the schema: decoding, where the grammar's cost is, dominates
    # the time (with schemas in the prompts, prefill would be most of it on a CPU).
    prompts = [
        tok.encode_chat([{"role": "user", "content": f"Describe thing {i} as a JSON object."}])
        for i in range(len(items))
    ]
    constrained = [
        SamplingParams(
            temperature=1.0,
            seed=seed + i,
            max_tokens=max_tokens,
            structured_outputs=StructuredOutputsParams(json=s),
        )
        for i, s in enumerate(items)
    ]
    llm.generate(prompts[:4], constrained[:4])  # warm-up: compiles, tokenizer view, allocator growth
    t_constrained, outs = _timed(llm, prompts, constrained)
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    free = [
        SamplingParams(temperature=1.0, seed=seed + i, max_tokens=n, ignore_eos=True)
        for i, n in enumerate(lengths)
    ]
    times_c, times_f = [t_constrained], []
    for i in range(repeat):
        if i:
            seconds, again = _timed(llm, prompts, constrained)
            assert [len(o.outputs[0].token_ids) for o in again] == lengths  # seeded: the same outputs
            times_c.append(seconds)
        seconds, outs_free = _timed(llm, prompts, free)
        assert [len(o.outputs[0].token_ids) for o in outs_free] == lengths
        times_f.append(seconds)
    t_constrained, t_free = min(times_c), min(times_f)
    tokens = sum(lengths)
    return {
        "streams": len(items),
        "output_tokens": tokens,
        "runs_constrained_s": times_c,
        "runs_unconstrained_s": times_f,
        "constrained_s": t_constrained,
        "unconstrained_s": t_free,
        "constrained_tok_per_s": tokens / t_constrained,
        "unconstrained_tok_per_s": tokens / t_free,
        "ratio": t_free / t_constrained,
    }


def shaped_model(tokenizer_from: str, root: Path) -> Path:
    """A config of Llama-3.1-8B's shape beside the tokenizer files of another model."""
    src = resolve_model(tokenizer_from)
    out = root / "llama8b"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    cfg = make_config("llama", **LLAMA_3_1_8B_SHAPE)
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--schemas", type=int, default=100)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument(
        "--repeat", type=int, default=1, help="overhead runs of each kind (alternating; fastest counts)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--shape", default=None, choices=["llama8b"], help="random weights of this shape")
    ap.add_argument("--tokenizer-from", default="smollm2-135m-instruct", help="with --shape: whose tokenizer")
    ap.add_argument("--skip-validity", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    model, load_format = args.model, args.load_format
    if args.shape:
        model, load_format = str(shaped_model(args.tokenizer_from, Path(tempfile.mkdtemp()))), "dummy"
    llm = LLM(model, device=args.device, max_model_len=2048, load_format=load_format)
    result: dict[str, Any] = {
        "model": args.shape or args.model,
        "load_format": load_format,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if not args.skip_validity:
        res = check_outputs(llm, schemas(args.schemas, args.seed), args.max_tokens, args.seed)
        result["validity"] = res
        print(
            f"validity: {res['valid']}/{res['schemas']} outputs parse and validate "
            f"({res['output_tokens']} tokens in {res['seconds']:.1f} s)"
        )
        for failure in res["failures"]:
            print("  failed:", json.dumps(failure))
    if not args.skip_overhead:
        res = overhead(llm, schemas(args.streams, args.seed + 1000), args.max_tokens, args.seed, args.repeat)
        result["overhead"] = res
        print(
            f"overhead: {res['streams']} streams, {res['output_tokens']} output tokens: constrained "
            f"{res['constrained_tok_per_s']:.1f} tok/s, unconstrained {res['unconstrained_tok_per_s']:.1f} tok/s "
            f"-> {res['ratio']:.3f}x"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
