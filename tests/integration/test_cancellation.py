"""A request whose client goes away is cancelled on its worker and its KV is freed:
stream closed, non-streaming request abandoned, or the whole gateway killed."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from rtpllm.runtime.stack import Stack
from tests.integration.support import MODEL_NAME, ExtraGateway, Gateway, get, http_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

BODY = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 950, "ignore_eos": True}


def _instances(gateway: Gateway) -> list[dict]:
    return get(gateway, "/instances").json()["instances"]


def _busy(gateway: Gateway) -> bool:
    return any(i["load"]["num_running"] > 0 or i["load"]["num_inflight"] > 0 for i in _instances(gateway))


def _wait_idle_and_free(gateway: Gateway, timeout: float) -> float:
    """Seconds until every worker reports nothing running and every KV block free."""
    t0 = time.monotonic()
    while True:
        items = _instances(gateway)
        if all(
            i["load"]["num_running"] == 0
            and i["load"]["num_inflight"] == 0
            and i["load"]["num_free_blocks"] == i["load"]["num_blocks"]
            for i in items
        ):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"workers still busy: {items}"
        time.sleep(0.1)


def _wait_busy(gateway: Gateway, timeout: float = 10) -> None:
    t0 = time.monotonic()
    while not _busy(gateway):
        assert time.monotonic() - t0 < timeout, "the request never showed up on a worker"
        time.sleep(0.05)


def test_stream_disconnect_cancels_and_frees_kv(stack: Stack) -> None:
    _wait_idle_and_free(stack, 10)
    with http_client(stack, timeout=30) as c:
        with c.stream("POST", f"{stack.url}/v1/chat/completions", json={**BODY, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            _wait_busy(stack)
        # Leaving the block closes the connection mid-stream.
    # Heartbeats carry the load once a second; the abort itself is immediate.
    assert _wait_idle_and_free(stack, 5) < 5


def test_non_streaming_disconnect_cancels_and_frees_kv(stack: Stack) -> None:
    _wait_idle_and_free(stack, 10)
    with pytest.raises(httpx.ReadTimeout), http_client(stack, timeout=httpx.Timeout(30, read=1.0)) as c:
        c.post(f"{stack.url}/v1/chat/completions", json={**BODY, "n": 2})
    assert _wait_idle_and_free(stack, 5) < 5
    text = get(stack, "/metrics").text
    assert 'rtpllm_requests_total{endpoint="chat",status="499"}' in text


def test_dead_gateway_requests_are_aborted_by_workers(stack: Stack, tmp_path: Path) -> None:
    _wait_idle_and_free(stack, 10)
    gw = ExtraGateway(stack, [], tmp_path, "gw-doomed")
    try:
        gw.wait_up()
        client = http_client(gw, timeout=30)
        r = client.send(client.build_request("POST", f"{gw.url}/v1/chat/completions", json={**BODY, "stream": True}), stream=True)
        lines = r.iter_lines()
        next(lines)
        _wait_busy(stack)
        gw.proc.kill()  # no cancel is ever sent: the workers must notice the gateway's lease ran out
        # lease 3 s + watch interval + one heartbeat for the report
        assert _wait_idle_and_free(stack, 8) < 8
        r.close()
        client.close()
    finally:
        gw.stop()
