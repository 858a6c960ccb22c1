"""Issue 15, with real processes: a table of bad images and image URLs sent to a real
gateway (nats-server on loopback, the tiny Qwen2-VL checkpoint as its model) each gets a
400 in OpenAI's error format whose message names the part and the problem, and the
gateway keeps serving.

All are refused while the gateway loads the request's images, before it needs an engine,
so the stack has none: a good image gets as far as 503 (no worker), which proves it
passed. Fetched URLs go to a local HTTP server on 127.0.0.2, the one internal address
the gateway is allowed (`--allowed-media-networks 127.0.0.2/32`); `localhost` is an
allowed domain that resolves to loopback, and the server's redirect points at a private
address (10.0.0.1, also an allowed domain, so the address check is what refuses it).
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from rtpllm.runtime.processes import http_json, wait_until
from rtpllm.runtime.stack import Stack, StackConfig
from tests.integration.support import client_for, dump_logs, http_client
from tests.multimodal_support import data_url, png_bytes, png_header_only, random_image, write_qwen2_vl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MODEL = "tiny-qwen2-vl"
PNG = png_bytes(random_image(40, 60, seed=0))
IMAGE_HOST = "127.0.0.2"


class ImageHandler(http.server.BaseHTTPRequestHandler):
    """/image.png: a good image; /redirect: 302 to a private address."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        if self.path == "/image.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.1/x.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer((IMAGE_HOST, 0), ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{IMAGE_HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """nats-server and a gateway serving the tiny Qwen2-VL checkpoint; no engine."""
    model = write_qwen2_vl(tmp_path_factory.mktemp("vlm") / MODEL).path
    log_dir = tmp_path_factory.mktemp("image-limits-logs")
    args = [
        "--allowed-media-domains", f"localhost,{IMAGE_HOST},10.0.0.1",
        "--allowed-media-networks", f"{IMAGE_HOST}/32",
        "--media-fetch-timeout", "5",
    ]  # fmt: skip
    stack = Stack(
        StackConfig(model=str(model), workers=0, use_redis=False, gateway_args=args, log_dir=log_dir)
    )
    try:
        stack.start_infra()
        proc = stack.start_gateway()
        wait_until(lambda: http_json(f"{stack.url}/health")[0] == 200, 120, "the gateway", [proc], 0.2)
        yield stack
    except BaseException:
        dump_logs(log_dir)
        raise
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def web(gateway: Stack) -> Iterator[httpx.Client]:
    with http_client(gateway, timeout=60) as c:
        yield c


def image(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def chat(*parts: dict[str, Any]) -> dict[str, Any]:
    content = [{"type": "text", "text": "What is this?"}, *parts]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


# (name, image parts as a function of the image server's URL, code, message fragment, param)
BAD = [
    ("corrupt bytes", lambda srv: [image(data_url(b"definitely not an image"))], "corrupt", "cannot decode image"),
    ("truncated", lambda srv: [image(data_url(PNG[: len(PNG) // 2]))], "corrupt", "cannot decode image"),
    ("zero size", lambda srv: [image(data_url(png_header_only(0, 0)))], "zero_size", "zero size (0x0)"),
    (
        "100 megapixels",
        lambda srv: [image(data_url(png_header_only(10_000, 10_000)))],
        "too_many_pixels",
        "10000x10000 = 100000000 pixels, over the limit of 50000000",
    ),
    ("disallowed domain", lambda srv: [image("https://example.com/cat.png")], "domain_not_allowed", "'example.com' is not in the allowed domains"),
    ("resolves to loopback", lambda srv: [image(f"http://localhost:{srv.rsplit(':', 1)[1]}/image.png")], "address_not_allowed", "a loopback address"),
    ("redirect to private", lambda srv: [image(f"{srv}/redirect")], "address_not_allowed", "resolves to 10.0.0.1, a private address"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "parts", "code", "says"), BAD, ids=[b[0] for b in BAD])
def test_bad_images_get_400_naming_the_problem(
    web: httpx.Client, image_server: str, name: str, parts: Any, code: str, says: str
) -> None:
    # The bad image second, after a good one: the part named must be the bad one.
    r = web.post("/v1/chat/completions", json=chat(image(data_url(PNG)), *parts(image_server)))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        code,
        "messages.0.content.2",
    )
    assert error["message"].startswith("messages[0].content[2]: ") and says in error["message"], error[
        "message"
    ]
    assert web.get("/health").status_code == 200


def test_too_many_images(web: httpx.Client) -> None:
    r = web.post("/v1/chat/completions", json=chat(*[image(data_url(PNG))] * 9))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("too_many_images", "messages")
    assert "9 images, more than the 8" in error["message"]


def test_detail_other_than_auto(web: httpx.Client) -> None:
    r = web.post("/v1/chat/completions", json=chat(image(data_url(PNG), detail="high")))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.1.image_url.detail"


def test_openai_client_sees_a_bad_request(gateway: Stack) -> None:
    client = client_for(gateway)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [image(data_url(png_header_only(10_000, 10_000)))]}],  # type: ignore[list-item]
        )
    assert info.value.code == "too_many_pixels" and "10000x10000" in info.value.message


def test_good_images_pass_and_the_gateway_keeps_serving(
    gateway: Stack, web: httpx.Client, image_server: str
) -> None:
    """A data: image and one fetched from the allowed internal server pass every check:
    the answer is the 503 of a stack without engines, not a 400."""
    r = web.post(
        "/v1/chat/completions",
        json=chat(image(data_url(PNG)), image(f"{image_server}/image.png", detail="auto")),
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_workers", r.text
    assert web.get("/health").status_code == 200
    assert gateway.gateway is not None and gateway.gateway.alive
    log = Path(gateway.config.log_dir or ".") / "gateway.log"
    assert "images (qwen2_vl)" in log.read_text()
