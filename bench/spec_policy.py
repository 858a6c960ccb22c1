"""The adaptive speculation policy against step costs measured on a GPU, on the CPU.

The real `Speculator` (acceptance estimates, step-cost models, allotment, exploration,
retries and back-off) plans every step of a simulated closed batch; only the device is
a model: a step of n tokens takes `device(n)`, and a step that plans or verifies
synchronously adds the host work a pipelined step hides (`host`). Draft acceptance is
geometric with rate A, as `bench/speculative.py`'s replay proposer makes it. The engine's
timing rules are kept: a verified step is timed whole, a pipelined one as the pipeline's
time per step, and a step left in flight with nothing before it not at all.

This is how the policy is developed between GPU sessions; the figures that count come
from `bench/speculative.py` on the GPU. The device curves are calibrated from H100 runs
(bench/results/2026-12-06-h100/, docs/benchmarks.md):

- llama8b-b64: 64 plain rows 7.45 ms (8,592 tok/s off), 320 verify rows 14.75 ms (fixed
  k = 4 at A = 0.7: 11,889 tok/s); a synchronous step's host time 2.3 ms, as the
  adaptive policy's verify steps took once its allotment stopped rebuilding the cost
  curve for every price (2026-12-06, session 6: 99 rows 9.0 ms, 274 rows 12.8 ms);
- llama8b-b1: 5.54 ms a token (180.6 tok/s off), 6.63 ms a 5-row verify step (410 tok/s
  at 2.72 tokens a step);
- qwen15b-b1: 1.82 ms a token (548.5 tok/s off), 2.71 ms a 5-row verify step (909 tok/s at
  2.46 tokens a step);
- compute-bound: every token costs its share (a CPU), where drafts never pay;
- before the run, what the bench's warm-up leaves in the cost models (H100, 2026-12-06
  runs' `cost_model`): 2-token verify steps of 6.52 ms (8B), 1-token pipelined steps of
  5.58 ms; for the 1.5B one verify step of 3.57 ms and pipelined ones of 1.79 ms.

    python bench/spec_policy.py [--tokens 128 512] [--acceptance 0 0.29 0.5 0.7 0.9] [--mixed 0.9,0.1 0.7,0.2] [--open | --warm] [--seed N]
    python bench/spec_policy.py --devices llama8b-b64-s9 --prompts 256 --runs 3   # as speculative.py --num-prompts 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))

from rtpllm.engine.request import Request  # noqa: E402
from rtpllm.sampling_params import SamplingParams  # noqa: E402
from rtpllm.speculative.adaptive import PolicyConfig  # noqa: E402
from rtpllm.speculative.proposer import Proposal, Proposer  # noqa: E402
from rtpllm.speculative.speculator import Speculator  # noqa: E402


@dataclass(frozen=True)
class Device:
    """Step costs: `device(n)` = base + per_token * (n - batch) seconds, plus `host`
    seconds for a step that plans or verifies synchronously. `warm_sync`, `warm_plain`:
    what the bench's warm-up leaves in the cost models before the run, one request
    decoding with n-gram drafts (a 2-token synchronous verify step; a 1-token pipelined
    step), whatever the batch of the run."""

    name: str
    batch: int
    base: float
    per_token: float
    host: float
    warm_sync: float
    warm_plain: float
    warm_syncs: int = 9  # how many 2-token verify steps the warm-up timed

    def seconds(self, tokens: int) -> float:
        return self.base + self.per_token * (tokens - self.batch)


DEVICES = {
    d.name: d
    for d in (
        Device("llama8b-b64", 64, 7.45e-3, 1.4e-5, 2.3e-3, 6.52e-3, 5.58e-3),
        # Session 7's H100 (2026-12-06, bench/results/2026-12-06-h100-s7/): verify steps
        # cheaper than above (97 tokens 9.43 ms, 185 tokens 11.59 ms, pipelined 64 rows
        # 7.03 ms; 7.45 ms a step off): 2.45e-5 s a token, 1.6 ms of host time.
        Device("llama8b-b64-s7", 64, 7.45e-3, 2.45e-5, 1.6e-3, 6.46e-3, 5.61e-3),
        # Session 9's H100 (2026-12-06, bench/results/2026-12-06-h100-s9/, c464d89): 128-token
        # verify steps 12.0-12.4 ms, 212-token ones 13.9 ms (2.0e-5 s a token over ~10.9 ms
        # at 64 rows), pipelined 64-row steps 7.2-7.4 ms: 3.5 ms of synchronous-step cost.
        Device("llama8b-b64-s9", 64, 7.35e-3, 2.0e-5, 3.5e-3, 6.8e-3, 5.53e-3),
        Device("llama8b-b1", 1, 5.54e-3, 3.0e-5, 0.97e-3, 6.52e-3, 5.58e-3),
        # The 1.5B's warm-up timed one 2-token verify step, at 3.57 ms (and 3.77 in an
        # earlier call): twice a pipelined step, where 5-token ones take 2.71 ms.
        Device("qwen15b-b1", 1, 1.82e-3, 1.0e-5, 0.85e-3, 3.57e-3, 1.79e-3, warm_syncs=1),
        Device("compute-b64", 64, 12.8e-3, 2.0e-4, 1.0e-3, 1.4e-3, 0.6e-3),
    )
}


class _Drafts(Proposer):
    """Always has k drafts; whether they are right is drawn at verification."""

    def propose(self, request_id: str, tokens: Sequence[int], k: int, private: bool = False) -> Proposal:
        return Proposal(tokens=(1,) * k, confidence=(1.0,) * k)

    def forget(self, request_id: str, output_tokens: Sequence[int] | None = None) -> None:
        pass


@dataclass
class Result:
    device: str
    acceptance: float | list[float]  # a list: a mixed batch, request i at acceptance[i % len]
    tokens: int
    policy: str
    speedup: float  # against every step pipelined without drafts
    steps: int
    drafting_steps: int
    explorations: int
    chosen_k: dict[int, int]
    # --runs: every timed run's speedup, in order (`speedup` is their median).
    run_speedups: list[float] | None = None


def _request(i: int) -> Request:
    req = Request(f"r{i}", [0] * 8, SamplingParams(temperature=0, max_tokens=1 << 20), max_model_len=1 << 21)
    req.num_computed_tokens = 8
    return req


def simulate(
    device: Device,
    acceptance: float | Sequence[float],
    tokens: int,
    config: PolicyConfig,
    seed: int = 0,
    open_batch: bool = False,
    warm: bool = False,
    jitter: float = 0.0,
    prompts: int | None = None,
    runs: int = 1,
) -> Result:
    """`device.batch` requests of `tokens` output tokens each; request i accepts at
    `acceptance`, or at acceptance[i % len] for a mixed batch. Closed (default): the
    batch runs until its last request is done, tail included, as `bench/speculative.py`
    runs it. `open_batch`: a finished request's place goes to a new one of the same
    acceptance until batch x tokens tokens are out, as on a server that always has work
    queued (no tail). `warm`: an untimed batch of the same kind first, on the same
    speculator (`bench/speculative.py --warm-batch`). `jitter`: every step takes its
    time times (1 + jitter x a standard normal draw, at least -0.5), as steps on a real
    host vary. `prompts`: `bench/speculative.py --num-prompts`: that many requests, at
    most a batch at a time, each finished one replaced while any wait, then the tail.
    `runs`: that many timed runs one after another on the same speculator (the bench's
    `--repeats`); the steps, drafting steps and explorations are the last run's."""
    rng = random.Random(seed)
    rates = [acceptance] if isinstance(acceptance, float | int) else list(acceptance)
    spec = Speculator(_Drafts(), config)
    batch = device.batch
    for i in range(9):  # the bench's warm-up: one request decoding with n-gram drafts
        if i < device.warm_syncs:
            spec.observe_step(2, device.warm_sync)
        spec.observe_step(1, device.warm_plain, pipelined=True)
    for _ in range(9):  # the pipelined steps of the prompts' run-up, as in the engine
        spec.observe_step(batch, device.seconds(batch), pipelined=True)
    count = prompts or batch
    if warm:
        _run(spec, device, rates, tokens, rng, open_batch, first=count, jitter=jitter, prompts=prompts)
        spec.counters.chosen_k.clear()
        spec.explorations = 0
    # Off: every step pipelined, full waves of `batch` (the last one what is left).
    waves = [min(batch, count - w) for w in range(0, count, batch)]
    off = sum(tokens * device.seconds(n) for n in waves) if prompts else tokens * device.seconds(batch)
    speedups: list[float] = []
    for run in range(runs):
        spec.explorations = 0
        first = (run + 1 + warm) * count
        elapsed, emitted, steps, drafting = _run(spec, device, rates, tokens, rng, open_batch, first=first, jitter=jitter, prompts=prompts)
        speedups.append((emitted / elapsed) / (count * tokens / off))
    policy = "adaptive" if config.adaptive else f"fixed k={config.max_k}"
    chosen = dict(sorted(spec.counters.chosen_k.items()))
    speedup = statistics.median(speedups)
    return Result(
        device.name, rates[0] if len(rates) == 1 else rates, tokens, policy, speedup, steps, drafting, spec.explorations, chosen,
        [round(x, 4) for x in speedups] if runs > 1 else None,
    )  # fmt: skip


def _noise(rng: random.Random, jitter: float) -> float:
    return max(1.0 + jitter * rng.gauss(0.0, 1.0), 0.5) if jitter else 1.0


def _run(
    spec: Speculator, device: Device, rates: list[float], tokens: int, rng: random.Random, open_batch: bool, first: int,
    jitter: float = 0.0, prompts: int | None = None,
) -> tuple[float, int, int, int]:
    """One batch (request ids from `first`): (seconds, tokens emitted, steps, drafting
    steps). `prompts`: that many requests through the batch, then its tail."""
    batch = device.batch
    active = [_request(first + i) for i in range(min(batch, prompts or batch))]
    accepts = {r.request_id: float(rates[i % len(rates)]) for i, r in enumerate(active)}
    left = {r.request_id: tokens for r in active}
    started = first + len(active)
    total = (prompts or batch) * tokens  # what the run emits, either way
    elapsed, emitted, steps, drafting, in_flight = 0.0, 0, 0, 0, False
    while active and emitted < total:
        n = len(active)
        # As in the engine: behind a pipelined step, every request's last token is still
        # in flight (a placeholder) when the next step is decided; it resolves before a
        # plan. (The count alone: these requests hold no tokens.)
        for req in active:
            req.num_placeholders = int(in_flight)
        planned = spec.wants_step(active)
        for req in active:
            req.num_placeholders = 0
        drafts = spec.plan(active, base_tokens=n, max_extra=1 << 16) if planned else {}
        if drafts:
            size = n + sum(len(d) for d in drafts.values())
            seconds = (device.seconds(size) + device.host) * _noise(rng, jitter)
            for req in active:
                d = drafts.get(req.request_id)
                accepted = 0
                if d:
                    while accepted < len(d) and rng.random() < accepts[req.request_id]:
                        accepted += 1
                    spec.observe_verified(req, len(d), accepted)
                # max_tokens caps a request's last drafts in the engine: none emitted past it
                out = min(1 + accepted, left[req.request_id])
                left[req.request_id] -= out
                emitted += out
            spec.observe_step(size, seconds)
            drafting += 1
            in_flight = False
        else:
            seconds = (device.seconds(n) + (device.host if planned else 0.0)) * _noise(rng, jitter)
            for req in active:
                left[req.request_id] -= 1
            emitted += n
            # A plan drained the pipeline before it was timed: this step restarts it.
            spec.observe_step(n, seconds if in_flight and not planned else None, pipelined=True)
            in_flight = True
        elapsed += seconds
        steps += 1
        for req in list(active):
            if left[req.request_id] <= 0:
                spec.forget(req)
                active.remove(req)
                if open_batch or (prompts and started < first + prompts):
                    new = _request(started)
                    accepts[new.request_id] = accepts[req.request_id]
                    left[new.request_id] = tokens
                    active.append(new)
                    started += 1
    return elapsed, emitted, steps, drafting


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", nargs="+", default=list(DEVICES), choices=list(DEVICES))
    ap.add_argument("--acceptance", nargs="+", type=float, default=[0.0, 0.29, 0.5, 0.7, 0.9])
    ap.add_argument("--mixed", nargs="*", default=["0.9,0.1", "0.7,0.2"], help="mixed batches: comma-separated acceptances, request i at the (i mod n)-th")
    ap.add_argument("--tokens", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--fixed", nargs="*", type=int, default=[4], help="fixed draft lengths to compare")
    ap.add_argument("--open", action="store_true", help="finished requests replaced by new ones (no tail)")
    ap.add_argument("--seed", type=int, default=0, help="the acceptance draws' seed")
    ap.add_argument("--jitter", type=float, default=0.0, help="relative spread of every step's time (a normal draw)")
    ap.add_argument("--warm", action="store_true", help="an untimed batch first, on the same speculator (speculative.py --warm-batch)")
    ap.add_argument("--prompts", type=int, help="that many requests through the batch, then its tail (speculative.py --num-prompts)")
    ap.add_argument("--runs", type=int, default=1, help="timed runs one after another on one speculator (speculative.py --repeats)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    configs = [PolicyConfig(max_k=4)] + [PolicyConfig(max_k=k, adaptive=False) for k in args.fixed]
    results: list[Result] = []
    print("device | A | tokens | policy | speedup | steps | drafting steps | explorations")
    for name in args.devices:
        for acceptance in [*args.acceptance, *([float(a) for a in m.split(",")] for m in args.mixed)]:
            for tokens in args.tokens:
                for config in configs:
                    r = simulate(
                        DEVICES[name], acceptance, tokens, config, open_batch=args.open, seed=args.seed, warm=args.warm,
                        jitter=args.jitter, prompts=args.prompts, runs=args.runs,
                    )  # fmt: skip
                    results.append(r)
                    shown = "/".join(map(str, r.acceptance)) if isinstance(r.acceptance, list) else r.acceptance
                    runs = f" ({', '.join(f'{x:.3f}' for x in r.run_speedups)})" if r.run_speedups else ""
                    print(f"{r.device} | {shown} | {r.tokens} | {r.policy} | {r.speedup:.3f}{runs} | {r.steps} | {r.drafting_steps} | {r.explorations}")
    if args.out:
        args.out.write_text(json.dumps({"devices": {n: asdict(DEVICES[n]) for n in args.devices}, "rows": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    main()
