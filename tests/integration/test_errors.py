"""Bad input gets the right 4xx in OpenAI's error format and disturbs nothing; 429, 503
and 504 come from gateways configured to produce them, on the shared bus."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from rtpllm.runtime.stack import Stack
from tests.integration.support import MODEL_NAME, ExtraGateway, http_client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MSG = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# (path, body (dict, or raw bytes), status, error code or None, param or None)
BAD_INPUTS = [
    (CHAT, b'{"model": "tiny-llama", "messages": [', 400, None, None),
    (CHAT, b"[1, 2]", 400, None, None),
    (CHAT, {"model": MODEL_NAME, "messages": "hi"}, 400, None, "messages"),
    (CHAT, {"model": MODEL_NAME, "messages": MSG, "temperature": "hot"}, 400, None, "temperature"),
    (CHAT, {"model": MODEL_NAME, "messages": MSG, "n": "2"}, 400, None, "n"),
    (CHAT, {"model": MODEL_NAME, "messages": MSG, "max_tokens": -5}, 400, None, "max_tokens"),
    (CHAT, {"model": MODEL_NAME, "messages": MSG, "max_tokens": 0}, 400, None, "max_tokens"),
    (CHAT, {"model": MODEL_NAME, "messages": MSG, "temperature": -0.5}, 400, None, "temperature"),
    (CHAT, {"model": MODEL_NAME, "messages": MSG, "n": 0}, 400, None, "n"),
    (CHAT, {"model": MODEL_NAME, "messages": MSG, "top_p": 0}, 400, None, "top_p"),
    (
        CHAT,
        {"model": MODEL_NAME, "messages": MSG, "logprobs": True, "top_logprobs": 50},
        400,
        None,
        "top_logprobs",
    ),
    (CHAT, {"model": MODEL_NAME, "messages": MSG, "stop": [""]}, 400, None, "stop"),
    (CHAT, {"model": MODEL_NAME, "messages": []}, 400, None, "messages"),
    (
        CHAT,
        {"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        None,
        "messages.0.role",
    ),
    (
        CHAT,
        {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        },
        400,
        "images_not_supported",
        "messages.0.content.0",
    ),
    (
        CHAT,
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * 5000}]},
        400,
        "context_length_exceeded",
        "messages",
    ),
    (
        CHAT,
        {"model": MODEL_NAME, "messages": MSG, "max_tokens": 1020},
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    (CHAT, {"model": "no-such-model", "messages": MSG}, 404, "model_not_found", "model"),
    (COMPLETIONS, {"model": MODEL_NAME, "prompt": ""}, 400, None, "prompt"),
    (COMPLETIONS, {"model": MODEL_NAME, "prompt": []}, 400, None, "prompt"),
    (COMPLETIONS, {"model": MODEL_NAME, "prompt": [5, 99999]}, 400, None, None),
    (COMPLETIONS, {"model": MODEL_NAME, "prompt": "x", "suffix": "y"}, 400, None, "suffix"),
    (COMPLETIONS, {"model": MODEL_NAME, "prompt": 12}, 400, None, "prompt"),
    (COMPLETIONS, {"model": "gpt-4", "prompt": "x"}, 404, "model_not_found", "model"),
]


def _check_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), BAD_INPUTS)
def test_bad_input_gets_4xx_then_valid_request_works(
    http: httpx.Client, path: str, body: object, status: int, code: str | None, param: str | None
) -> None:
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    err = _check_error(r, status, code, param)
    assert err["type"] == "invalid_request_error"
    ok = http.post(CHAT, json={"model": MODEL_NAME, "messages": MSG, "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_unknown_path_and_method(http: httpx.Client) -> None:
    _check_error(http.get("/v1/nothing"), 404)
    _check_error(http.get(CHAT), 405)


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=MSG, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)


@pytest.fixture(scope="module")
def extra_gateways(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ExtraGateway]]:
    """Gateways that refuse quickly (429), serve a model nobody runs (503) and time out
    fast (504), all on the shared bus and workers."""
    log_dir: Path = tmp_path_factory.mktemp("extra-gateways")
    gateways = {
        # Admission counts sequences: the n=8 stream of the 429 test fills all 8 slots.
        "tight": ExtraGateway(
            stack, ["--max-running", "8", "--max-queue", "1", "--retry-after", "2"], log_dir, "gw-tight"
        ),
        "orphan": ExtraGateway(stack, ["--served-model-name", "nobody-serves-this"], log_dir, "gw-orphan"),
        "hasty": ExtraGateway(stack, ["--request-timeout", "1"], log_dir, "gw-hasty"),
    }
    try:
        for gw in gateways.values():
            gw.wait_up()
        yield gateways
    finally:
        for gw in gateways.values():
            gw.stop()


def _long_stream(client: httpx.Client, url: str) -> tuple[httpx.Response, Iterator[str]]:
    # 8 x 1000 tokens: many seconds on CPU, and cancelled as soon as the test is done.
    body = {
        "model": MODEL_NAME,
        "messages": MSG,
        "n": 8,
        "max_tokens": 1000,
        "stream": True,
        "ignore_eos": True,
    }
    r = client.send(client.build_request("POST", f"{url}{CHAT}", json=body), stream=True)
    assert r.status_code == 200
    lines = r.iter_lines()  # kept: dropping it would close the response (a disconnect)
    next(lines)  # admitted and running
    return r, lines


def test_429_when_admission_queue_is_full(
    extra_gateways: dict[str, ExtraGateway], http: httpx.Client
) -> None:
    gw = extra_gateways["tight"]
    url = gw.url
    small = {"model": MODEL_NAME, "messages": MSG, "max_tokens": 2}
    with http_client(gw, timeout=30) as c1, http_client(gw, timeout=30) as c2, ThreadPoolExecutor(1) as pool:
        running, _lines = _long_stream(c1, url)  # its 8 sequences take every slot
        queued = pool.submit(c2.post, f"{url}{CHAT}", json=small)
        try:
            # It waits in the queue (at most 1 sequence).
            _wait_for_metric(http, f"{url}/metrics", "rtpllm_queue_depth 1.0")
            r = http.post(f"{url}{CHAT}", json=small)
            err = _check_error(r, 429, "rate_limit_exceeded")
            assert r.headers["retry-after"] == "2"
            assert err["type"] == "rate_limit_error"
        finally:
            running.close()
        # Closing the first stream frees its slot: the queued request runs and completes.
        assert queued.result(timeout=30).status_code == 200
    metrics = http.get(f"{url}/metrics").text
    assert 'rtpllm_requests_total{endpoint="chat",status="429"} 1.0' in metrics


def _wait_for_metric(http: httpx.Client, url: str, line: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while line not in (text := http.get(url).text).splitlines():
        assert time.monotonic() < deadline, f"{line!r} never appeared in {url}:\n{text}"
        time.sleep(0.05)


def test_503_when_no_worker_serves_the_model(
    extra_gateways: dict[str, ExtraGateway], http: httpx.Client
) -> None:
    url = extra_gateways["orphan"].url
    r = http.post(f"{url}{CHAT}", json={"model": "nobody-serves-this", "messages": MSG})
    err = _check_error(r, 503, "no_workers")
    assert err["type"] == "server_error"
    assert r.headers["retry-after"] == "1"  # a worker may be starting
    assert http.get(f"{url}/ready").status_code == 503
    assert http.get(f"{url}/health").status_code == 200


def test_504_on_deadline(extra_gateways: dict[str, ExtraGateway], http: httpx.Client) -> None:
    url = extra_gateways["hasty"].url
    body = {"model": MODEL_NAME, "messages": MSG, "n": 4, "max_tokens": 990, "ignore_eos": True}
    start = time.monotonic()
    r = http.post(f"{url}{CHAT}", json=body)
    _check_error(r, 504, "deadline_exceeded")
    assert time.monotonic() - start < 5
    # Streaming: headers went out already, so the deadline arrives as an error event.
    with http.stream("POST", f"{url}{CHAT}", json={**body, "stream": True}) as s:
        assert s.status_code == 200
        events = [line for line in s.iter_lines() if line]
    assert '"code":"deadline_exceeded"' in events[-1]
    assert events[-1] != "data: [DONE]"
