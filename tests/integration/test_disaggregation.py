"""Prefill/decode disaggregation with real processes: NATS, Redis, a gateway, prefill and
decode instances moving KV over the data plane.

- Greedy outputs through prefill -> decode equal one engine doing both, for a batch of
  mixed prompt lengths (short ones prefilled locally, long ones remotely, chunked).
- Faults: a transfer stalled past its lease, a prefill instance killed mid-transfer and
  a decode instance killed mid-stream each end as docs/disaggregation.md says, and every
  survivor ends with no block leaked.
"""

from __future__ import annotations

import concurrent.futures
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from rtpllm import LLM, SamplingParams
from rtpllm.runtime.stack import Stack
from rtpllm.serving.disagg_prefill import FAULT_STALL_ENV
from tests.integration.support import MODEL_NAME, client_for, get, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# Small prefill chunks, so long prompts ship their KV in several pieces while computing.
ENGINE_ARGS = ["--max-num-batched-tokens", "48", "--block-size", "16"]
THRESHOLD = 40  # --local-prefill-below: shorter uncached prompts stay on the decode instance


def reference(tiny_model: Path, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Greedy texts of one engine doing prefill and decode (the aggregated reference)."""
    llm = LLM(str(tiny_model), device="cpu", block_size=16, max_num_batched_tokens=48)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(prompts, params)]


def instances(stack: Stack) -> dict[str, dict]:
    return {i["instance_id"]: i for i in get(stack, "/instances", timeout=5).json()["instances"]}


def wait_no_leaks(stack: Stack, timeout: float = 15) -> dict[str, dict]:
    """Until every live instance reports all blocks free (cached ones count as free),
    nothing held for a transfer and nothing awaiting KV, in a heartbeat sent after this
    call started (an older one may predate the requests)."""
    deadline = time.monotonic() + timeout
    seen = {iid: i["heartbeat_seq"] for iid, i in instances(stack).items()}
    while True:
        items = instances(stack)
        leaks = {
            iid: i["load"]
            for iid, i in items.items()
            if i["load"]["num_free_blocks"] != i["load"]["num_blocks"] or i["load"]["num_held_kv"] or i["load"]["num_awaiting_kv"]
            or i["heartbeat_seq"] <= seen.get(iid, -1)
        }
        if not leaks:
            return items
        assert time.monotonic() < deadline, f"blocks still in use: {leaks}"
        time.sleep(0.3)


def complete(client: openai.OpenAI, prompt: list[int], max_tokens: int) -> openai.types.Completion:
    return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})


def stream_text(client: openai.OpenAI, prompt: list[int], max_tokens: int) -> tuple[str, int, float | None]:
    """(text, content chunks, seconds to the first chunk) of a streamed completion."""
    start = time.monotonic()
    first = None
    parts: list[str] = []
    stream = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first if first is not None else time.monotonic() - start
            parts.append(chunk.choices[0].text)
    return "".join(parts), len(parts), first


@pytest.fixture(scope="module")
def pd_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("pd-stack-logs")
    with running_stack(
        tiny_model, log_dir, workers=0, worker_args=ENGINE_ARGS, prefill=1, decode=1,
        decode_args=["--local-prefill-below", str(THRESHOLD)],
    ) as stack:  # fmt: skip
        yield stack


def test_disaggregated_greedy_equals_aggregated(pd_stack: Stack, tiny_model: Path) -> None:
    rng = random.Random(7)
    lengths = [5, 17, 39, 40, 64, 100, 150, 201, 33, 90]
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in lengths]
    streamed = [rng.randrange(3, 300) for _ in range(120)]
    max_tokens = 24
    *want, want_streamed = reference(tiny_model, prompts + [streamed], max_tokens)
    client = client_for(pd_stack)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: complete(client, p, max_tokens), prompts))
    for prompt, resp, text in zip(prompts, results, want, strict=True):
        assert resp.usage.completion_tokens == max_tokens
        assert resp.choices[0].text == text, f"prompt of {len(prompt)} tokens"
    # Streaming: the first token comes from the prefill instance, the rest from decode.
    text, chunks, ttft = stream_text(client, streamed, max_tokens)
    assert text == want_streamed and chunks >= 2 and ttft is not None

    items = wait_no_leaks(pd_stack)
    decode = next(i for i in items.values() if i["role"] == "decode")
    prefill = next(i for i in items.values() if i["role"] == "prefill")
    d = decode["disaggregation"]
    long_prompts = sum(1 for n in lengths if n >= THRESHOLD) + 1
    assert d["remote_prefills"] == long_prompts and d["local_prefills"] == len(lengths) - long_prompts + 1, d
    assert d["remote_fallbacks"] == 0
    (backend, received), = d["transfers"].items()
    assert backend == "shm" and received["transfers"] == long_prompts and received["bytes"] > 0
    assert prefill["disaggregation"]["transfers"][backend]["transfers"] == long_prompts

    metrics = get(pd_stack, "/metrics").text
    assert f'rtpllm_kv_transfers_total{{backend="shm",instance="{decode["instance_id"]}"}}' in metrics
    assert 'kind="remote"' in metrics


# -- faults --------------------------------------------------------------------------

STALL_S = 6.0  # a prefill instance stalls this long before its last KV blocks...
LEASE_S = 3.0  # ...which is past the decode instance's lease on the transfer


@pytest.fixture(scope="module")
def fault_pd(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("pd-fault-logs")
    with running_stack(
        tiny_model, log_dir, workers=0, worker_args=ENGINE_ARGS + ["--drain-timeout", "1"], prefill=2, decode=2,
        decode_args=["--local-prefill-below", "0", "--kv-lease", str(LEASE_S), "--kv-backends", "tcp"],
        role_env={"prefill": {FAULT_STALL_ENV: str(STALL_S)}},
    ) as stack:  # fmt: skip
        yield stack


@pytest.fixture(scope="module")
def fault_client(fault_pd: Stack) -> openai.OpenAI:
    return client_for(fault_pd)


def test_transfer_stalled_past_its_lease_is_prefilled_locally(fault_pd: Stack, fault_client: openai.OpenAI, tiny_model: Path) -> None:
    prompt = [(7 * i) % 300 for i in range(100)]
    want = reference(tiny_model, [prompt], 16)[0]
    start = time.monotonic()
    text, _, ttft = stream_text(fault_client, prompt, 16)
    elapsed = time.monotonic() - start
    assert text == want
    assert ttft is not None and ttft < LEASE_S, "the first token comes from the prefill instance before it stalls"
    assert LEASE_S <= elapsed < STALL_S + 5
    items = wait_no_leaks(fault_pd, timeout=STALL_S + 10)  # the stalled sender gives up and frees its blocks too
    fallbacks = sum(i["disaggregation"]["remote_fallbacks"] for i in items.values() if i["role"] == "decode")
    assert fallbacks >= 1


def test_prefill_killed_mid_transfer(fault_pd: Stack, fault_client: openai.OpenAI, tiny_model: Path) -> None:
    prompt = [(11 * i + 5) % 300 for i in range(90)]
    want = reference(tiny_model, [prompt], 16)[0]
    got: dict[str, object] = {}
    first = threading.Event()

    def consume() -> None:
        parts: list[str] = []
        try:
            stream = fault_client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True, extra_body={"ignore_eos": True}
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    parts.append(chunk.choices[0].text)
                    first.set()
        except Exception as exc:  # noqa: BLE001
            got["error"] = exc
        got["text"] = "".join(parts)

    # The prefill instance that serves it logs the stall as it begins: holding the KV it
    # has not sent, after the first token. Its log line, not a heartbeat (one a second,
    # later on a loaded machine), says which one to kill before the decode's lease ends.
    stalled: list[str] = []
    stalling = threading.Event()
    for iid, item in instances(fault_pd).items():
        if item["role"] == "prefill":
            def watch(line: str, iid: str = iid) -> None:
                if "fault injection: stalling transfer" in line:
                    stalled.append(iid)
                    stalling.set()
            fault_pd.worker_by_instance(iid).on_line(watch)
    thread = threading.Thread(target=consume)
    thread.start()
    assert first.wait(30), "no first token"
    assert stalling.wait(LEASE_S), "no prefill instance stalled holding KV"
    busy = stalled[0]
    start = time.monotonic()
    fault_pd.worker_by_instance(busy).signal(signal.SIGKILL)
    thread.join(30)
    assert not thread.is_alive()
    assert "error" not in got, got
    assert got["text"] == want
    assert time.monotonic() - start < LEASE_S + 5
    wait_no_leaks(fault_pd, timeout=15)


def test_decode_killed_mid_stream_ends_the_stream(fault_pd: Stack, fault_client: openai.OpenAI) -> None:
    got: dict[str, object] = {}
    tokens = threading.Event()

    def consume() -> None:
        n = 0
        try:
            stream = fault_client.completions.create(
                model=MODEL_NAME, prompt=list(range(5, 30)), max_tokens=900, temperature=0, stream=True, extra_body={"ignore_eos": True}
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    n += 1
                    if n >= 30:
                        tokens.set()
        except Exception as exc:  # noqa: BLE001
            got["error"] = exc
        got["ended"] = time.monotonic()

    thread = threading.Thread(target=consume)
    thread.start()
    assert tokens.wait(60), "the stream never got going"
    busy = [iid for iid, i in instances(fault_pd).items() if i["role"] == "decode" and i["inflight_from_this_gateway"] > 0]
    assert len(busy) == 1
    killed = time.monotonic()
    fault_pd.worker_by_instance(busy[0]).signal(signal.SIGKILL)
    thread.join(15)
    assert not thread.is_alive(), "the stream hangs"
    assert float(got["ended"]) - killed < 5.0  # type: ignore[arg-type]
    assert isinstance(got.get("error"), openai.APIError), got
    items = wait_no_leaks(fault_pd, timeout=15)
    assert busy[0] not in items
    # The surviving decode instance still serves.
    text, _, _ = stream_text(fault_client, list(range(50, 120)), 8)
    assert text
