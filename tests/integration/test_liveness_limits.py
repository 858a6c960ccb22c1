"""Issue 14, with real processes: no request takes the stack down.

- Huge bodies (8 MB, 20 MB, chunked) get 413 at once; the worker stays registered and
  the next request is served.
- A prompt that provably cannot fit is refused before it is tokenized.
- A gateway event loop blocked for 10 s (RTPLLM_TEST_HOOKS=1's POST /debug/block_loop)
  loses no worker and no request.
- A worker that goes silent (SIGSTOP) is dropped after its lease, its stream ends with
  an error, and it is back in /instances within one heartbeat of resuming (SIGCONT), with
  the request the gateway failed cancelled on it.

One stack of its own (one worker): the tests stop and block its processes.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rtpllm.runtime.stack import Stack
from tests.integration.support import MODEL_NAME, http_client, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HEARTBEAT_S = 1.0  # the workers' default --heartbeat-interval
SLACK_S = 0.5
MSG = [{"role": "user", "content": "tell me a long story"}]


@pytest.fixture(scope="module")
def live_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("liveness-stack-logs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RTPLLM_TEST_HOOKS", "1")  # inherited by the gateway: POST /debug/block_loop
        with running_stack(tiny_model, log_dir, workers=1) as stack:
            env.delenv("RTPLLM_TEST_HOOKS")
            yield stack


@pytest.fixture(scope="module")
def web(live_stack: Stack) -> Iterator[httpx.Client]:
    with http_client(live_stack, timeout=60) as c:
        yield c


def instance_ids(web: httpx.Client) -> list[str]:
    return [i["instance_id"] for i in web.get("/instances").json()["instances"]]


def instances_lost(web: httpx.Client) -> float:
    text = web.get("/metrics").text
    return sum(float(v) for v in re.findall(r"^rtpllm_instances_lost_total\{[^}]*\} (\S+)$", text, re.M))


def chat_works(web: httpx.Client) -> None:
    r = web.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MSG, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def huge_chat(size: int) -> bytes:
    return json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * size}]}).encode()


def wait_for(predicate: object, timeout: float, what: str) -> float:
    """Poll until `predicate()`; returns the seconds it took."""
    t0 = time.monotonic()
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.05)
    return time.monotonic() - t0


def test_huge_bodies_get_413_and_the_stack_keeps_answering(live_stack: Stack, web: httpx.Client) -> None:
    before, lost = instance_ids(web), instances_lost(web)
    assert len(before) == 1
    for size in (8_000_000, 20_000_000):
        t0 = time.monotonic()
        r = web.post(
            "/v1/chat/completions", content=huge_chat(size), headers={"Content-Type": "application/json"}
        )
        elapsed = time.monotonic() - t0
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_too_large"
        assert elapsed < 5, f"{size} bytes took {elapsed:.1f} s to refuse"
        print(f"{size} byte body refused in {elapsed * 1000:.0f} ms (sent in full by the client)")

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        body = huge_chat(8_000_000)
        for i in range(0, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]

    r = web.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chat_works(web)
    assert instance_ids(web) == before and instances_lost(web) == lost


def test_prompt_that_cannot_fit_is_refused_before_tokenizing(web: httpx.Client) -> None:
    # 3 MB of text under the 4 MiB body limit: its length alone proves it needs more
    # tokens than the context window holds.
    t0 = time.monotonic()
    r = web.post(
        "/v1/chat/completions", content=huge_chat(3_000_000), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert (
        r.json()["error"]["code"] == "context_length_exceeded" and "at least" in r.json()["error"]["message"]
    )
    assert time.monotonic() - t0 < 3
    chat_works(web)


def test_batches_are_admitted_by_their_sequences(web: httpx.Client) -> None:
    # 9 prompts x n=128 = 1152 sequences: more than the gateway runs at once (1024).
    body = {"model": MODEL_NAME, "prompt": ["a"] * 9, "n": 128, "max_tokens": 1}
    r = web.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert "1152 sequences" in r.json()["error"]["message"]


def test_blocked_gateway_loop_loses_no_worker_and_no_request(live_stack: Stack, web: httpx.Client) -> None:
    before, lost = instance_ids(web), instances_lost(web)
    # A stream in flight across the stall: it must finish normally afterwards.
    body = {"model": MODEL_NAME, "messages": MSG, "max_tokens": 300, "stream": True, "ignore_eos": True}
    started, outcome = threading.Event(), []

    def read_stream() -> None:
        with (
            http_client(live_stack, timeout=120) as c,
            c.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                started.set()
            outcome.append(lines)

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert started.wait(30)
    r = web.post("/debug/block_loop", params={"seconds": 10}, timeout=60)
    freed = time.monotonic()
    assert r.status_code == 200 and r.json()["blocked_s"] == 10
    back_after = wait_for(
        lambda: instance_ids(web) == before, HEARTBEAT_S + SLACK_S, "the worker is not back in /instances"
    )
    print(f"worker listed {back_after:.2f} s after the gateway's loop freed")
    reader.join(60)
    assert not reader.is_alive() and outcome
    lines = [line for line in outcome[0] if line]
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines), lines[-3:]
    assert instances_lost(web) == lost, "the worker was dropped during the stall"
    chat_works(web)
    assert time.monotonic() - freed < 30


def test_silent_worker_is_dropped_then_readmitted_and_its_request_reconciled(
    live_stack: Stack, web: httpx.Client
) -> None:
    (instance,) = instance_ids(web)
    proc = live_stack.worker_by_instance(instance)
    body = {"model": MODEL_NAME, "messages": MSG, "max_tokens": 900, "stream": True, "ignore_eos": True}
    stopped = False
    try:
        with (
            http_client(live_stack, timeout=60) as c,
            c.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            lines = (line for line in r.iter_lines() if line)
            for line in lines:
                if line.startswith("data: {") and '"content"' in line:
                    break
            proc.signal(signal.SIGSTOP)  # mid-stream: silent, not dead
            stopped = True
            t0 = time.monotonic()
            rest = list(lines)
            failed_after = time.monotonic() - t0
        # Its lease (3 s: heartbeats 1 s apart) ran out: the stream ended with an error.
        assert '"worker_lost"' in rest[-1] and "[DONE]" not in rest[-1], rest[-3:]
        assert failed_after < 3 + 1.5, f"the stream took {failed_after:.1f} s to fail"
        assert instance_ids(web) == []
        r = web.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MSG, "max_tokens": 4})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        time.sleep(1.0)
    finally:
        if stopped:
            proc.signal(signal.SIGCONT)
    back_after = wait_for(lambda: instance_ids(web) == [instance], HEARTBEAT_S + SLACK_S, "not re-admitted")
    print(f"worker re-admitted {back_after:.2f} s after SIGCONT")

    def idle() -> bool:
        (item,) = web.get("/instances").json()["instances"]
        return item["load"]["num_running"] == 0 and item["load"]["num_waiting"] == 0

    # The request the gateway failed does not run on for nobody: it was cancelled there.
    wait_for(idle, 3 * HEARTBEAT_S + SLACK_S, "the failed request still runs on the worker")
    chat_works(web)
