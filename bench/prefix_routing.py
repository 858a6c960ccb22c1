"""Prefix-aware routing on a multi-turn chat replay (issue 6): round-robin, least-loaded
and cache-aware routing in one run, each over the same seeded workload.

    python bench/prefix_routing.py --json routing.json           # CPU, 4 workers, ~5 min
    python bench/prefix_routing.py --smoke                       # CPU check of the script, < 1 min
    python bench/prefix_routing.py --device cuda --gpus 0        # 4 Qwen3-0.6B-shape engines on one GPU
    python bench/prefix_routing.py --device cuda --shape llama8b --gpus 0,1,2,3 --gpu-memory-utilization 0.85

The workload (deterministic for a --seed): --system-prompts random system prompts of
--system-len tokens; --conversations conversations, each on one system prompt drawn
uniformly (so many conversations share each), arriving as a Poisson process at --rate
conversations/s. A conversation has --turns turns; turn t's prompt is the system prompt
followed by t (user, answer) pairs and a new user message (--user-len random token ids).
The "answer" appended to the history is --max-tokens fixed random ids, not what the
model returned: the prefix cache only needs identical prefixes, and fixed answers keep
every prompt the same in every policy. A conversation sends its next turn when the
previous one has finished (plus an exponential think time of mean --think-time s).

Each policy gets a fresh stack (NATS, Redis, --instances combined workers, a gateway
with `--router POLICY`: `rtpllm.runtime.stack`), so every policy starts with cold
prefix caches; a few short requests warm each engine before the replay. Every engine
gets a KV pool of --kv-blocks blocks: the system prompts and open conversations together
do not fit one instance's pool but do fit the pools of all of them, which is the case
prefix-aware routing is for. (With a pool that holds every system prompt, round-robin
caches each of them on every instance, and with one that holds every open conversation
it finds most histories too: with 4 system prompts and ample KV, round-robin's hit ratio
is ~0.7 and 2x is out of reach by construction.)

The client (this process) streams /v1/completions with token-id prompts over httpx
(temperature 0, ignore_eos, stream_options.include_usage) and reports per policy:
- prefix token hit ratio = sum of usage.prompt_tokens_details.cached_tokens / sum of
  prompt tokens, over the replay's requests;
- TTFT p50/p95/p99 = first content chunk - send time, client side;
- throughput = requests and output tokens / (last finish - first send).
Alongside: the gateway's routing decisions by reason (rtpllm_routing_decisions_total),
each instance's share of the prompt tokens and its own prefix hit ratio (/instances),
how many later turns went to the instance of their conversation's previous turn and how
many found that turn's prompt cached (a passive subscriber on the workers' NATS
subjects sees where each request goes), and the cores the run and anything else on the
machine used during the replay (on a shared machine, other work skews TTFT).

Targets (issue 6): cache-aware P95 TTFT at least 40% lower than round-robin's, and its
hit ratio at least 2x round-robin's; printed last, least-loaded from the same run beside.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from serving_bench import completion_body, new_client, pct, raise_interrupt, redis_installed, strict_json

from rtpllm.loader.random_checkpoint import (
    LLAMA_3_1_8B_SHAPE,
    QWEN3_0_6B_SHAPE,
    TINY_SHAPE,
    make_config,
    write_random_checkpoint,
)
from rtpllm.protocol import subjects
from rtpllm.protocol.messages import GenerateRequest, decode
from rtpllm.runtime.stack import Stack, StackConfig
from rtpllm.serving.bus import connect_nats
from rtpllm.tokenizer.byte_tokenizer import write_byte_tokenizer

POLICIES = ("round-robin", "least-loaded", "cache-aware")
TARGET_TTFT_CUT = 0.40  # cache-aware P95 TTFT <= (1 - this) x round-robin's
TARGET_HIT_X = 2.0  # cache-aware hit ratio >= this x round-robin's

# name -> (family, served model name, shape). On CPU the engines load a random
# checkpoint written here; on CUDA only config.json is written (--load-format dummy).
SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "tiny": ("llama", "tiny-llama-random", TINY_SHAPE),
    # Prefilling 512 tokens takes ~130 ms on one core of a 2-core VM (fp32): prefill cost
    # shows in TTFT, and a replay of a few hundred requests still takes about a minute.
    "small": (
        "llama",
        "small-llama-random",
        {
            **TINY_SHAPE,
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
        },
    ),  # fmt: skip
    "qwen3-0.6b": ("qwen3", "qwen3-0.6b-random", QWEN3_0_6B_SHAPE),
    "llama8b": ("llama", "llama-3.1-8b-random", LLAMA_3_1_8B_SHAPE),
}
# Flags of every engine (later flags win: --engine-args overrides any of them).
CPU_ENGINE_ARGS = "--device cpu --max-num-seqs 128 --max-num-batched-tokens 512 --drain-timeout 5"
GPU_ENGINE_ARGS = "--device cuda --load-format dummy --max-num-batched-tokens 8192 --drain-timeout 5"
# Defaults of the workload flags per profile.
PROFILES: dict[str, dict[str, Any]] = {
    # 12 system prompts (384 blocks) against 256-block pools: one instance holds a third
    # of them, four together all of them plus their share of the histories. Users think
    # 4 s between turns, so ~30 conversations are open at once (their histories compete
    # for the pools too) while the 2 cores stay below saturation (~4.5 requests/s).
    "cpu": {
        "shape": "small", "instances": 4, "gpus": "", "conversations": 48, "turns": 8, "system_prompts": 12,
        "system_len": 512, "user_len": 32, "max_tokens": 16, "rate": 1.0, "think_time": 4.0,
        "kv_blocks": 256, "gpu_memory_utilization": None, "ready_timeout": 180.0,
    },
    "smoke": {
        "shape": "tiny", "instances": 2, "gpus": "", "conversations": 6, "turns": 3, "system_prompts": 4,
        "system_len": 64, "user_len": 8, "max_tokens": 4, "rate": 2.0, "think_time": 0.2,
        "kv_blocks": 24, "gpu_memory_utilization": None, "ready_timeout": 120.0,
    },
    # Not run yet: the proportions of "cpu" at GPU sizes (32 system prompts of 2048
    # tokens = 4096 blocks against 3072-block pools, ~130 conversations open at once).
    "gpu": {
        "shape": "qwen3-0.6b", "instances": 4, "gpus": "0", "conversations": 256, "turns": 8,
        "system_prompts": 32, "system_len": 2048, "user_len": 128, "max_tokens": 64, "rate": 4.0,
        "think_time": 4.0, "kv_blocks": 3072, "gpu_memory_utilization": 0.2, "ready_timeout": 900.0,
    },
}  # fmt: skip


@dataclass(frozen=True)
class Workload:
    conversations: int
    turns: int
    system_prompts: int
    system_len: int
    user_len: int
    max_tokens: int
    rate: float  # conversations per second (Poisson)
    think_time: float  # mean seconds between a turn's end and the next turn's send
    seed: int
    vocab: int

    @property
    def max_prompt_len(self) -> int:
        return self.system_len + self.turns * self.user_len + (self.turns - 1) * self.max_tokens


@dataclass(frozen=True)
class Conversation:
    start: float  # offset of its first turn from the replay's start, s
    system: int  # which system prompt
    bodies: tuple[bytes, ...]  # one encoded request per turn
    think: tuple[float, ...]  # think time before each turn (0 before the first)


@dataclass
class TurnLog:
    """One request as the client saw it."""

    conversation: int
    turn: int
    sent: float
    first: float | None = None
    done: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    instance: str | None = None  # where the gateway sent it (seen on the bus)
    error: str | None = None


# -- the model directory ---------------------------------------------------------------------


def write_model_dir(out: Path, shape: str, device: str, max_len: int) -> Path:
    """CPU: a random checkpoint (the engines load it); CUDA: config.json and a byte
    tokenizer only, for --load-format dummy. Context at least `max_len`."""
    family, _, dims = SHAPES[shape]
    dims = {**dims, "max_position_embeddings": max(dims["max_position_embeddings"], max_len)}
    if device == "cpu":
        return write_random_checkpoint(out, family, **dims)
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(family, **dims)
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_byte_tokenizer(out, cfg["vocab_size"])
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg["eos_token_id"]}))
    return out


# -- the workload ----------------------------------------------------------------------------


def build_workload(w: Workload, model: str) -> list[Conversation]:
    """Every conversation's arrival, system prompt, turn bodies and think times, encoded
    before the clock starts (the same in every policy)."""
    rng = random.Random(f"{w.seed}-workload")

    def tokens(n: int) -> list[int]:
        return [rng.randrange(w.vocab) for _ in range(n)]

    systems = [tokens(w.system_len) for _ in range(w.system_prompts)]
    out: list[Conversation] = []
    start = 0.0
    for _ in range(w.conversations):
        system = rng.randrange(w.system_prompts)
        history = list(systems[system])
        bodies = []
        for _turn in range(w.turns):
            history += tokens(w.user_len)
            bodies.append(completion_body(model, history, w.max_tokens, usage=True))
            history += tokens(w.max_tokens)  # the "answer" the next turn carries
        think = tuple(
            rng.expovariate(1 / w.think_time) if w.think_time > 0 and t else 0.0 for t in range(w.turns)
        )
        out.append(Conversation(start, system, tuple(bodies), think))
        start += rng.expovariate(w.rate)
    return out


# -- the client ------------------------------------------------------------------------------

_JSON = {"content-type": "application/json"}


async def send(client: httpx.AsyncClient, url: str, body: bytes, log: TurnLog) -> None:
    """POST one streamed completion: stamp the first content chunk and read the usage
    chunk. Content chunks are found by string search, not parsed: the client shares the
    cores with the stack and must stay cheap."""
    try:
        async with client.stream("POST", url, content=body, headers=_JSON) as r:
            if r.status_code != 200:
                log.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                if log.first is None and '"text":' in line:
                    log.first = time.perf_counter()
                elif '"choices":[]' in line:
                    usage = json.loads(line[6:])["usage"]
                    log.prompt_tokens = usage["prompt_tokens"]
                    log.completion_tokens = usage["completion_tokens"]
                    log.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                elif line.startswith('data: {"error"'):
                    log.error = line[6:306]
        log.done = time.perf_counter()
        if log.error is None and log.prompt_tokens == 0:
            log.error = "no usage chunk"
    except httpx.HTTPError as exc:
        log.error = f"{type(exc).__name__}: {exc}"


async def replay(url: str, conversations: list[Conversation]) -> list[TurnLog]:
    completions = f"{url}/v1/completions"
    logs: list[TurnLog] = []
    async with new_client() as client:
        t0 = time.perf_counter()

        async def converse(i: int, conv: Conversation) -> None:
            await asyncio.sleep(max(0.0, t0 + conv.start - time.perf_counter()))
            for turn, (body, think) in enumerate(zip(conv.bodies, conv.think, strict=True)):
                if think:
                    await asyncio.sleep(think)
                log = TurnLog(i, turn, time.perf_counter())
                logs.append(log)
                await send(client, completions, body, log)
                if log.error:
                    await asyncio.sleep(0.2)  # no busy loop against a failing stack

        await asyncio.gather(*(converse(i, c) for i, c in enumerate(conversations)))
    return logs


async def warm_up(url: str, model: str, w: Workload, engines: int) -> None:
    """Two short requests per engine, on prompts that share nothing with the replay (the
    first requests of a process are slow: lazy initialisation, allocator growth)."""
    rng = random.Random(f"{w.seed}-warmup")
    completions = f"{url}/v1/completions"
    async with new_client() as client:
        for _ in range(2):
            logs = [TurnLog(-1, -1, time.perf_counter()) for _ in range(engines)]
            bodies = [completion_body(model, [rng.randrange(w.vocab) for _ in range(48)], 2, usage=True) for _ in logs]
            await asyncio.gather(
                *(send(client, completions, b, log) for b, log in zip(bodies, logs, strict=True))
            )
            errors = [log.error for log in logs if log.error]
            if errors:
                raise RuntimeError(
                    f"warm-up: {len(errors)} of {len(logs)} requests failed, first: {errors[0]}"
                )


class RouteTap:
    """Which instance each replayed request went to: a passive subscriber to the workers'
    generate subjects (NATS delivers each request to every subscriber; only the worker
    answers), matching requests to turns by their prompts."""

    def __init__(self, conversations: list[Conversation]) -> None:
        self.turn_of: dict[int, tuple[int, int]] = {}
        for i, conv in enumerate(conversations):
            for turn, body in enumerate(conv.bodies):
                self.turn_of[hash(tuple(json.loads(body)["prompt"]))] = (i, turn)
        self.routed: dict[tuple[int, int], str] = {}
        self._nc: Any = None

    async def watch(self, nats_url: str) -> None:
        self._nc = await connect_nats(nats_url, "bench-route-tap")

        async def on_request(msg: Any) -> None:
            instance = msg.subject.split(".")[-2]
            turn = self.turn_of.get(hash(tuple(decode(msg.data, GenerateRequest).prompt_token_ids)))
            if turn is not None:
                self.routed.setdefault(turn, instance)

        await self._nc.subscribe(subjects.generate_subject("*"), cb=on_request)
        await self._nc.flush()

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.drain()


# -- the stack's own view --------------------------------------------------------------------


async def gateway_view(url: str) -> dict[str, Any]:
    """Routing decisions (by reason) and per-instance counters, as the gateway has them."""
    async with new_client() as client:
        metrics = (await client.get(f"{url}/metrics", timeout=10)).text
        items = (await client.get(f"{url}/instances", timeout=10)).json()["instances"]
    decisions: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("rtpllm_routing_decisions_total{"):
            labels, value = line.rsplit(" ", 1)
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            decisions[reason] = decisions.get(reason, 0.0) + float(value)
    instances = {
        i["instance_id"]: {
            "prompt_tokens": i["load"]["prompt_tokens"],
            "prefix_hit_ratio": i["load"]["prefix_hit_ratio"],
            "preemptions": i["load"]["num_preemptions"],
            "cached_blocks": i["cached_blocks"],
        }
        for i in items
    }
    return {"decisions": decisions, "instances": instances}


def view_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """The replay's share of the counters (the warm-up's requests taken out)."""
    decisions = {k: int(v - before["decisions"].get(k, 0.0)) for k, v in after["decisions"].items()}
    instances = {}
    for iid, inst in after["instances"].items():
        prev = before["instances"].get(iid, {})
        instances[iid] = {
            **inst,
            "prompt_tokens": inst["prompt_tokens"] - prev.get("prompt_tokens", 0),
            "preemptions": inst["preemptions"] - prev.get("preemptions", 0),
        }
    return {"decisions": {k: v for k, v in decisions.items() if v}, "instances": instances}


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, of the processes `pids`) so far, from
    /proc: the difference over the replay tells how much of the machine other work took
    (the CPU run shares 2 cores). NaN where /proc cannot be read."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait
        ours = 0.0
        for pid in pids:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += (int(stat[11]) + int(stat[12])) / tick
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")
    return busy, ours


# -- statistics ------------------------------------------------------------------------------


def summarize(policy: str, logs: list[TurnLog]) -> dict[str, Any]:
    ok = [log for log in logs if log.error is None and log.done is not None]
    ttft = [log.first - log.sent for log in ok if log.first is not None]
    prompt = sum(log.prompt_tokens for log in ok)
    cached = sum(log.cached_tokens for log in ok)
    out_tokens = sum(log.completion_tokens for log in ok)
    start = min((log.sent for log in logs), default=0.0)
    end = max((log.done for log in ok if log.done is not None), default=start)
    seconds = end - start
    errors = [log.error for log in logs if log.error]
    # Later turns: did the turn go where the previous one went, and did it find the whole
    # previous prompt cached (its full blocks)? History lost where the turn stayed means
    # the instance evicted it; where it moved, routing lost it.
    prev = {(log.conversation, log.turn): log for log in ok}
    later = [
        (log, prev[(log.conversation, log.turn - 1)])
        for log in ok
        if (log.conversation, log.turn - 1) in prev
    ]
    stayed = [(log, p) for log, p in later if log.instance is not None and log.instance == p.instance]
    moved = [(log, p) for log, p in later if log.instance is not None and log.instance != p.instance]

    def lost(pairs: list[tuple[TurnLog, TurnLog]]) -> int:
        return sum(1 for log, p in pairs if log.cached_tokens < p.prompt_tokens // 16 * 16)

    ms = 1e3
    return {
        "policy": policy,
        "requests": len(logs),
        "completed": len(ok),
        "errors": len(errors),
        "first_errors": errors[:3],
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_ratio": cached / prompt if prompt else float("nan"),
        "ttft_p50_ms": pct(ttft, 0.5) * ms,
        "ttft_p95_ms": pct(ttft, 0.95) * ms,
        "ttft_p99_ms": pct(ttft, 0.99) * ms,
        "ttft_mean_ms": sum(ttft) / len(ttft) * ms if ttft else float("nan"),
        # TTFT by turn: turn 0 can only hit a system prompt; later turns also their history.
        "ttft_p95_first_turn_ms": pct(
            [log.first - log.sent for log in ok if log.first and log.turn == 0], 0.95
        )
        * ms,
        "ttft_p95_later_turns_ms": pct(
            [log.first - log.sent for log in ok if log.first and log.turn > 0], 0.95
        )
        * ms,
        "later_turns": len(later),
        "stayed": len(stayed),
        "moved": len(moved),
        "history_lost_stayed": lost(stayed),
        "history_lost_moved": lost(moved),
        "seconds": seconds,
        "requests_per_s": len(ok) / seconds if seconds > 0 else float("nan"),
        "output_tokens_per_s": out_tokens / seconds if seconds > 0 else float("nan"),
        "output_tokens": out_tokens,
    }


# -- orchestration ---------------------------------------------------------------------------


def start_stack(policy: str, model_dir: Path, model: str, args: argparse.Namespace, log_dir: Path) -> Stack:
    """NATS, Redis, --instances combined workers and a gateway routing by `policy`."""
    engine_args = shlex.split(args.base_engine_args) + shlex.split(args.engine_args)
    log_dir.mkdir(parents=True, exist_ok=True)
    config = StackConfig(
        model=str(model_dir),
        served_model_name=model,
        workers=args.instances,
        worker_args=engine_args,
        gateway_args=["--router", policy, "--max-running", "4096", "--max-queue", "4096"],
        log_dir=log_dir,
        use_redis=args.use_redis,
        auth=False,  # an open stack: the client here sends no API key (the check costs microseconds)
    )
    stack = Stack(config)
    try:
        stack.start_infra()
        for i in range(args.instances):
            if args.gpu_list:
                # Stack takes one environment per role; each engine may need its own GPU
                # (not --device cuda:N: Triton launches on the current device).
                stack.config.role_env = {
                    "worker": {"CUDA_VISIBLE_DEVICES": args.gpu_list[i % len(args.gpu_list)]}
                }
            stack.add_worker()
        stack.start_gateway()
        stack.wait_ready(args.ready_timeout)
    except BaseException:
        stack.stop()
        raise
    return stack


async def measure(
    url: str,
    model: str,
    policy: str,
    w: Workload,
    conversations: list[Conversation],
    pids: list[int],
    nats_url: str,
    engines: int,
) -> dict[str, Any]:
    await warm_up(url, model, w, engines)
    await asyncio.sleep(1.2)  # heartbeats after the warm-up: its counters, not the replay's
    before = await gateway_view(url)
    tap = RouteTap(conversations)
    await tap.watch(nats_url)
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    try:
        logs = await replay(url, conversations)
    finally:
        await tap.close()
    cpu1, t1 = cpu_seconds(pids), time.perf_counter()
    for log in logs:
        log.instance = tap.routed.get((log.conversation, log.turn))
    await asyncio.sleep(1.2)  # a heartbeat after the last request
    row = summarize(policy, logs)
    # Cores in use during the replay: by this stack and client, and by anything else.
    row["cores_ours"] = (cpu1[1] - cpu0[1]) / (t1 - t0)
    row["cores_other"] = (cpu1[0] - cpu0[0]) / (t1 - t0) - row["cores_ours"]
    row["gateway"] = view_delta(await gateway_view(url), before)
    start = min(log.sent for log in logs)
    # Per request (for --json): conversation, turn, send offset s, TTFT ms, prompt and cached tokens.
    row["turns"] = [
        [log.conversation, log.turn, round(log.sent - start, 4),
         round((log.first - log.sent) * 1e3, 2) if log.first is not None else None,
         log.prompt_tokens, log.cached_tokens]
        for log in sorted(logs, key=lambda log: log.sent)
    ]  # fmt: skip
    return row


def say(message: str) -> None:
    print(f"prefix_routing: {message}", flush=True)


def fmt(value: float, spec: str = ".1f") -> str:
    return "-" if value != value else format(value, spec)  # NaN: nothing measured


def print_report(rows: list[dict[str, Any]], failures: dict[str, str], header: str) -> None:
    for row in rows:
        g = row["gateway"]
        decisions = ", ".join(f"{k} {v}" for k, v in sorted(g["decisions"].items())) or "-"
        total = sum(i["prompt_tokens"] for i in g["instances"].values()) or 1
        shares = " ".join(
            f"{100 * i['prompt_tokens'] / total:.0f}%/{i['prefix_hit_ratio']:.2f}"
            for _, i in sorted(g["instances"].items())
        )
        preempted = sum(i["preemptions"] for i in g["instances"].values())
        errors = f"; errors: {row['first_errors']}" if row["errors"] else ""
        print(
            f"  {row['policy']}: routed by {decisions}; later turns sent to the previous turn's instance "
            f"{row['stayed']}/{row['later_turns']} (history not cached {row['history_lost_stayed']}), elsewhere "
            f"{row['moved']} (history not cached {row['history_lost_moved']}); TTFT p95 turn 0 "
            f"{fmt(row['ttft_p95_first_turn_ms'])} ms, later turns {fmt(row['ttft_p95_later_turns_ms'])} ms\n"
            f"    instances (prompt-token share/engine hit ratio): {shares}; preemptions {preempted}; cores used "
            f"during the replay: this run {fmt(row['cores_ours'], '.2f')}, other processes {fmt(row['cores_other'], '.2f')}"
            f"{errors}"
        )
    for policy, error in failures.items():
        print(f"  {policy}: FAILED: {error}")
    print(f"\n{header}")
    print(
        f"{'policy':<13} {'requests':>8} {'hit ratio':>9} {'TTFT p50':>8} {'p95':>8} {'p99':>8} "
        f"{'req/s':>6} {'out tok/s':>9} {'seconds':>7}"
    )
    for row in rows:
        print(
            f"{row['policy']:<13} {row['completed']:>4}/{row['requests']:<3} {fmt(row['hit_ratio'], '.3f'):>9} "
            f"{fmt(row['ttft_p50_ms']):>8} {fmt(row['ttft_p95_ms']):>8} {fmt(row['ttft_p99_ms']):>8} "
            f"{fmt(row['requests_per_s'], '.2f'):>6} {fmt(row['output_tokens_per_s']):>9} {row['seconds']:>7.1f}"
        )
    by = {row["policy"]: row for row in rows}
    if "cache-aware" not in by or "round-robin" not in by:
        print("target: not checked (needs cache-aware and round-robin)")
        return
    ca, rr, ll = by["cache-aware"], by["round-robin"], by.get("least-loaded")
    cut = 1 - ca["ttft_p95_ms"] / rr["ttft_p95_ms"]
    ll_cut = f"   (least-loaded, same run: {fmt(ll['ttft_p95_ms'])} ms)" if ll else ""
    verdict = "PASS" if cut >= TARGET_TTFT_CUT else "FAIL"
    print(
        f"target: cache-aware TTFT p95 >= {100 * TARGET_TTFT_CUT:.0f}% lower than round-robin's: "
        f"{fmt(ca['ttft_p95_ms'])} vs {fmt(rr['ttft_p95_ms'])} ms ({100 * cut:.0f}% lower) {verdict}"
        f"{ll_cut}"
    )
    x = ca["hit_ratio"] / rr["hit_ratio"] if rr["hit_ratio"] > 0 else float("inf")
    ll_x = f"   (least-loaded, same run: {ll['hit_ratio']:.3f})" if ll else ""
    verdict = "PASS" if x >= TARGET_HIT_X else "FAIL"
    print(
        f"target: cache-aware hit ratio >= {TARGET_HIT_X:g}x round-robin's: "
        f"{ca['hit_ratio']:.3f} vs {rr['hit_ratio']:.3f} ({x:.2f}x) {verdict}{ll_x}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c, g = PROFILES["cpu"], PROFILES["gpu"]

    def dflt(key: str) -> str:
        return f"(default {c[key] if c[key] not in ('', None) else 'none'}; cuda {g[key]})"

    # fmt: off
    ap.add_argument("--smoke", action="store_true", help="CPU check of the script: tiny model, 2 instances, tiny replay")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="engines' device; picks the defaults below")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated subset of: {', '.join(POLICIES)}")
    ap.add_argument("--shape", choices=sorted(SHAPES), help=f"model shape {dflt('shape')}")
    ap.add_argument("--instances", type=int, help=f"combined workers per stack {dflt('instances')}")
    ap.add_argument("--gpus", help=f"CUDA: engine i runs on GPU i mod len(GPUS) {dflt('gpus')}")
    ap.add_argument("--conversations", type=int, help=f"conversations replayed {dflt('conversations')}")
    ap.add_argument("--turns", type=int, help=f"turns per conversation {dflt('turns')}")
    ap.add_argument("--system-prompts", type=int, help=f"distinct system prompts {dflt('system_prompts')}")
    ap.add_argument("--system-len", type=int, help=f"tokens per system prompt {dflt('system_len')}")
    ap.add_argument("--user-len", type=int, help=f"tokens per user message {dflt('user_len')}")
    ap.add_argument("--max-tokens", type=int, help=f"tokens per answer {dflt('max_tokens')}")
    ap.add_argument("--rate", type=float, help=f"conversations arriving per second, Poisson {dflt('rate')}")
    ap.add_argument("--think-time", type=float, help=f"mean s between a turn's end and the next turn, exponential {dflt('think_time')}")
    ap.add_argument("--kv-blocks", type=int, help=f"KV blocks (16 tokens) per engine; 0: sized by the engine {dflt('kv_blocks')}")
    ap.add_argument("--gpu-memory-utilization", type=float, help=f"CUDA: per engine {dflt('gpu_memory_utilization')}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-args", default="", help="extra flags of every engine, after the defaults")
    ap.add_argument("--redis", choices=["auto", "on", "off"], default="auto", help="start a redis-server with each stack (auto: if installed)")
    ap.add_argument("--ready-timeout", type=float, help=f"s to wait for a stack to be ready {dflt('ready_timeout')}")
    ap.add_argument("--log-dir", type=Path, help="stack logs go to DIR/<policy>/ (default: a new temporary directory)")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    # fmt: on
    args = ap.parse_args(argv)
    if args.smoke and args.device != "cpu":
        ap.error("--smoke runs on CPU")
    profile = "smoke" if args.smoke else ("gpu" if args.device == "cuda" else "cpu")
    for key, value in PROFILES[profile].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    base = CPU_ENGINE_ARGS if args.device == "cpu" else GPU_ENGINE_ARGS
    max_len = args.system_len + args.turns * (args.user_len + args.max_tokens)  # the last prompt + its answer
    args.max_model_len = -(-max_len // 256) * 256
    base += f" --max-model-len {args.max_model_len}"
    if args.kv_blocks:
        base += f" --num-blocks {args.kv_blocks}"
    if args.device == "cuda" and args.gpu_memory_utilization is not None:
        base += f" --gpu-memory-utilization {args.gpu_memory_utilization}"
    args.base_engine_args = base
    args.use_redis = args.redis == "on" or (args.redis == "auto" and redis_installed())
    args.gpu_list = [x.strip() for x in args.gpus.split(",") if x.strip()] if args.device == "cuda" else []
    args.policy_list = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not args.policy_list or any(p not in POLICIES for p in args.policy_list):
        ap.error(f"--policies: choose from {', '.join(POLICIES)}")
    if (
        min(args.instances, args.conversations, args.turns, args.system_prompts, args.system_len) < 1
        or args.rate <= 0
    ):
        ap.error(
            "--instances, --conversations, --turns, --system-prompts, --system-len and --rate must be positive"
        )
    if args.kv_blocks and args.kv_blocks * 16 < max_len:
        ap.error(f"--kv-blocks {args.kv_blocks} cannot hold one {max_len}-token conversation")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _, model, dims = SHAPES[args.shape]
    log_root = args.log_dir or Path(tempfile.mkdtemp(prefix="rtpllm-routing-logs-"))
    rows: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    signal.signal(signal.SIGTERM, raise_interrupt)  # stop the stacks on SIGTERM as on Ctrl-C
    started = time.monotonic()
    w = Workload(
        conversations=args.conversations, turns=args.turns, system_prompts=args.system_prompts,
        system_len=args.system_len, user_len=args.user_len, max_tokens=args.max_tokens, rate=args.rate,
        think_time=args.think_time, seed=args.seed, vocab=dims["vocab_size"],
    )  # fmt: skip
    conversations = build_workload(w, model)
    n_req = w.conversations * w.turns
    with tempfile.TemporaryDirectory(prefix="rtpllm-routing-model-") as tmp:
        model_dir = write_model_dir(Path(tmp) / model, args.shape, args.device, args.max_model_len)
        say(f"logs in {log_root}; {n_req} requests per policy, prompts up to {w.max_prompt_len} tokens")
        for policy in args.policy_list:
            say(f"{policy}: starting a stack ({args.instances} workers, {model}) ...")
            t0 = time.monotonic()
            stack: Stack | None = None
            try:
                stack = start_stack(policy, model_dir, model, args, log_root / policy)
                say(f"{policy}: ready in {time.monotonic() - t0:.0f} s; warming up, then the replay")
                procs = [stack.nats, stack.redis, stack.gateway, *stack.workers]
                pids = [os.getpid()] + [p.pid for p in procs if p is not None]
                row = asyncio.run(
                    measure(stack.url, model, policy, w, conversations, pids, stack.nats_url, args.instances)
                )
                rows.append(row)
                say(
                    f"{policy}: {row['completed']}/{row['requests']} requests in {row['seconds']:.1f} s, hit ratio "
                    f"{row['hit_ratio']:.3f}, TTFT p50 {fmt(row['ttft_p50_ms'])} ms, p95 {fmt(row['ttft_p95_ms'])} ms"
                )
            except KeyboardInterrupt:
                say("interrupted; stopping")
                return 130
            except Exception as exc:  # report it; the other policies may still run
                failures[policy] = f"{type(exc).__name__}: {exc}"
                say(f"{policy}: failed: {failures[policy]}")
            finally:
                if stack is not None:
                    stack.stop()
    header = (
        f"{model} on {args.device.upper()}, {args.instances} instances x {args.kv_blocks or 'auto'} KV blocks: "
        f"{w.conversations} conversations x {w.turns} turns at {w.rate:g}/s, {w.system_prompts} system prompts x "
        f"{w.system_len} tokens, user {w.user_len}, answer {w.max_tokens} tokens; TTFT in ms "
        f"({time.monotonic() - started:.0f} s in all)"
    )
    print_report(rows, failures, header)
    if args.json:
        report = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {
                "host": platform.node(),
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
            },
            "command": " ".join(sys.argv),
            "model_shape": {"name": model, **dims},
            "engine_args": args.base_engine_args + " " + args.engine_args,
            "instances": args.instances,
            "workload": asdict(w),
            "results": rows,
            "failures": failures,
            "targets": {"ttft_p95_cut": TARGET_TTFT_CUT, "hit_ratio_x": TARGET_HIT_X},
            "log_dir": str(log_root),
            "seconds": time.monotonic() - started,
        }
        args.json.write_text(json.dumps(strict_json(report), indent=2))
    errors = sum(row["errors"] for row in rows)
    return 1 if failures or errors else 0


if __name__ == "__main__":
    sys.exit(main())
