"""Workers that die or stop: streams end with an error in bounded time, the gateway stays
healthy, the next request goes to a live worker, and with no worker left requests get 503.

These tests kill processes, so they get a stack of their own (3 workers, used up in order).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from rtpllm.runtime.stack import Stack
from tests.integration.support import MODEL_NAME, auth_headers, client_for, get, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MSG = [{"role": "user", "content": "tell me a long story"}]
LONG = {"model": MODEL_NAME, "messages": MSG, "max_tokens": 950, "stream": True, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def fault_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("fault-stack-logs")
    with running_stack(tiny_model, log_dir, workers=3, worker_args=["--drain-timeout", "1"]) as stack:
        yield stack


@pytest.fixture(scope="module")
def fclient(fault_stack: Stack) -> openai.OpenAI:
    return client_for(fault_stack)


def _serving_instance(stack: Stack, timeout: float = 5) -> str:
    """The instance the gateway runs exactly one request on."""
    deadline = time.monotonic() + timeout
    while True:
        items = get(stack, "/instances").json()["instances"]
        busy = [i["instance_id"] for i in items if i["inflight_from_this_gateway"] > 0]
        if len(busy) == 1:
            return busy[0]
        assert time.monotonic() < deadline, f"no single busy instance: {items}"
        time.sleep(0.05)


def _consume_until_error(stream: openai.Stream, started: threading.Event) -> tuple[int, BaseException | None]:
    chunks = 0
    try:
        for _ in stream:
            chunks += 1
            if chunks == 3:
                started.set()
    except BaseException as exc:  # the error under test
        return chunks, exc
    return chunks, None


def test_sigterm_drains_then_fails_running_stream(fault_stack: Stack, fclient: openai.OpenAI) -> None:
    stream = fclient.chat.completions.create(**LONG)
    started = threading.Event()
    result: list[tuple[int, BaseException | None]] = []
    reader = threading.Thread(target=lambda: result.append(_consume_until_error(stream, started)))
    reader.start()
    assert started.wait(30)
    proc = fault_stack.worker_by_instance(_serving_instance(fault_stack))
    t0 = time.monotonic()
    proc.signal(signal.SIGTERM)
    reader.join(30)
    elapsed = time.monotonic() - t0
    assert not reader.is_alive()
    chunks, error = result[0]
    code = proc.wait(15)
    info = f"chunks={chunks} error={error!r} elapsed={elapsed:.2f}s exit={code}"
    # 950 tokens take longer than the 1 s drain: the stream gets a clear error, no hang.
    assert isinstance(error, openai.APIError), info
    assert "shut down" in str(error), info
    assert elapsed < 1 + 3, info
    assert code == 0, info


def test_killed_worker_ends_stream_within_5s_and_next_request_works(fault_stack: Stack, fclient: openai.OpenAI) -> None:
    stream = fclient.chat.completions.create(**LONG)
    started = threading.Event()
    result: list[tuple[int, BaseException | None]] = []
    reader = threading.Thread(target=lambda: result.append(_consume_until_error(stream, started)))
    reader.start()
    assert started.wait(30)
    victim = _serving_instance(fault_stack)
    proc = fault_stack.worker_by_instance(victim)
    t0 = time.monotonic()
    proc.kill()
    reader.join(10)
    elapsed = time.monotonic() - t0
    assert not reader.is_alive(), "the stream hung after its worker died"
    chunks, error = result[0]
    assert isinstance(error, openai.APIError), error
    print(f"stream failed {elapsed:.2f} s after its worker was killed")
    assert elapsed < 5.0, f"stream took {elapsed:.1f} s to fail"
    assert chunks >= 3
    # The gateway is healthy and serves the next request on a live worker at once.
    assert httpx.get(f"{fault_stack.url}/health").status_code == 200
    r = fclient.chat.completions.create(model=MODEL_NAME, messages=MSG, max_tokens=4)
    assert r.choices[0].finish_reason in ("length", "stop")
    ready = httpx.get(f"{fault_stack.url}/ready").json()
    assert ready["workers"] == sum(1 for p in fault_stack.workers if p.alive)
    metrics = get(fault_stack, "/metrics").text
    assert 'rtpllm_instances_lost_total{reason="worker_lost"} 1.0' in metrics


def test_no_worker_left_gives_503(fault_stack: Stack, fclient: openai.OpenAI) -> None:
    for proc in fault_stack.workers:
        proc.kill()
    for proc in fault_stack.workers:
        proc.wait(5)
    # Right away (the lease has not expired yet) and after it: 503 either way, no hang.
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        fclient.chat.completions.create(model=MODEL_NAME, messages=MSG, max_tokens=4)
    assert info.value.status_code == 503
    assert time.monotonic() - t0 < 5
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "server_error"
    deadline = time.monotonic() + 10
    while httpx.get(f"{fault_stack.url}/ready").status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = httpx.post(f"{fault_stack.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "x"}, headers=auth_headers(fault_stack))
    assert r.status_code == 503
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{fault_stack.url}/health").status_code == 200
