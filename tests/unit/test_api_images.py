"""The gateway's image loading (rtpllm.api.images): every way an `image_url` part is
refused gets a 400 naming the part and the problem, against a real HTTP server on
127.0.0.1 for the fetched ones; and what an accepted image carries on."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from rtpllm.api.errors import APIError
from rtpllm.api.images import ImageLoader, MediaSettings, image_parts
from rtpllm.api.requests import ChatMessage
from rtpllm.multimodal.families import VisionFamily
from rtpllm.multimodal.fetch import ImageFetcher
from rtpllm.multimodal.image_input import content_hash
from tests.multimodal_support import data_url, png_bytes, png_header_only, random_image

PNG = png_bytes(random_image(30, 40, seed=0))  # 40 wide, 30 high


class FakeFamily:
    """Stands for a vision family: loading images needs only to know there is one."""

    name = "fake"


FAMILY: VisionFamily = FakeFamily()  # type: ignore[assignment]


def chat(*parts: Any, text_first: bool = True) -> list[ChatMessage]:
    """A system message, then a user message of a text part and `parts` (so the image
    parts are messages[1].content[1], [2], ...)."""
    content = [{"type": "text", "text": "look"}, *parts] if text_first else list(parts)
    return [ChatMessage(role="system", content="s"), ChatMessage(role="user", content=content)]


def image(url: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


async def load(
    messages: list[ChatMessage], fetcher: ImageFetcher | None = None, **settings: Any
) -> list[Any]:
    loader = ImageLoader(MediaSettings(**settings), "tiny-vlm", FAMILY, fetcher)
    try:
        return await loader.load(messages)
    finally:
        await loader.aclose()


async def refused(messages: list[ChatMessage], **settings: Any) -> APIError:
    with pytest.raises(APIError) as info:
        await load(messages, **settings)
    assert info.value.status == 400
    return info.value


# -- accepted --------------------------------------------------------------------------


async def test_data_urls_in_both_forms_load_in_prompt_order() -> None:
    other = png_bytes(random_image(20, 10, seed=1))
    messages = chat(image(data_url(PNG), detail="auto"), {"type": "image_url", "image_url": data_url(other)})
    loaded = await load(messages)
    assert [(i.part.where, i.part.param) for i in loaded] == [
        ("messages[1].content[1]", "messages.1.content.1"),
        ("messages[1].content[2]", "messages.1.content.2"),
    ]
    assert [i.data for i in loaded] == [PNG, other], "the original encoded bytes go on"
    assert [i.content_hash for i in loaded] == [content_hash(PNG), content_hash(other)]
    assert [(i.width, i.height, i.format) for i in loaded] == [(40, 30, "PNG"), (10, 20, "PNG")]


async def test_a_large_image_is_decoded_off_the_loop() -> None:
    big = png_bytes(random_image(200, 300, seed=2))  # > 32 KiB: parsed and decoded in a thread
    assert len(big) > 64 * 1024
    (loaded,) = await load(chat(image(data_url(big))))
    assert (loaded.width, loaded.height, loaded.data) == (300, 200, big)


async def test_exif_orientation_decides_the_size() -> None:
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 40x30 file is seen 30x40, as the encoder will
    random_image(30, 40, seed=3).save(buf, "JPEG", exif=exif)
    (loaded,) = await load(chat(image(data_url(buf.getvalue(), "image/jpeg"))))
    assert (loaded.width, loaded.height) == (30, 40)


async def test_no_images_no_work() -> None:
    assert await load([ChatMessage(role="user", content="hi")]) == []
    loader = ImageLoader(MediaSettings(), "text-model")  # a text model, text-only chat: fine
    assert await loader.load(chat()) == []


# -- refused before any image is read ---------------------------------------------------


async def test_text_model_does_not_take_images() -> None:
    loader = ImageLoader(MediaSettings(), "tiny-llama")
    with pytest.raises(APIError) as info:
        await loader.load(chat(image(data_url(PNG))))
    err = info.value
    assert (err.status, err.param, err.code) == (400, "messages.1.content.1", "images_not_supported")
    assert "model 'tiny-llama' does not take images" in err.message


async def test_too_many_images() -> None:
    err = await refused(chat(*[image(data_url(PNG))] * 3), max_images=2)
    assert (err.param, err.code) == ("messages", "too_many_images")
    assert "3 images, more than the 2" in err.message


@pytest.mark.parametrize("detail", ["low", "high", "", 1])
async def test_detail_other_than_auto_is_refused_naming_the_field(detail: Any) -> None:
    err = await refused(chat(image(data_url(PNG), detail=detail)))
    assert err.param == "messages.1.content.1.image_url.detail"
    assert "messages[1].content[1].image_url.detail: only 'auto' is supported" in err.message


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "image_url"}, "messages.1.content.1.image_url"),
        ({"type": "image_url", "image_url": 5}, "messages.1.content.1.image_url"),
        ({"type": "image_url", "image_url": ""}, "messages.1.content.1.image_url"),
        ({"type": "image_url", "image_url": {}}, "messages.1.content.1.image_url.url"),
        ({"type": "image_url", "image_url": {"url": ["x"]}}, "messages.1.content.1.image_url.url"),
    ],
)
async def test_malformed_image_url_parts(part: dict[str, Any], param: str) -> None:
    err = await refused(chat(part))
    assert err.param == param and "expected an image URL string" in err.message


def test_image_parts_finds_every_part_in_order() -> None:
    messages = [
        ChatMessage(role="user", content=[image("data:a")]),
        ChatMessage(role="assistant", content="ok"),
        ChatMessage(role="user", content=[{"type": "text", "text": "t"}, image("data:b"), image("data:c")]),
    ]
    assert [(p.message, p.part, p.url) for p in image_parts(messages)] == [
        (0, 0, "data:a"),
        (2, 1, "data:b"),
        (2, 2, "data:c"),
    ]


# -- bad images --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason", "says"),
    [
        (data_url(b"this is not an image at all"), "corrupt", "cannot decode image"),
        (data_url(PNG[: len(PNG) // 2]), "corrupt", "cannot decode image"),
        (data_url(png_header_only(0, 0)), "zero_size", "zero size (0x0)"),
        (data_url(png_header_only(10_000, 10_000)), "too_many_pixels", "10000x10000 = 100000000 pixels"),
        (
            data_url(b"II*\x00" + b"\x00" * 64, "image/tiff"),
            "unsupported_format",
            "unsupported image format TIFF",
        ),
        ("data:image/png;base64,@@@@", "bad_data_url", "not valid base64"),
        ("data:text/plain;base64,aGk=", "bad_data_url", "not an image type"),
        ("ftp://example.com/x.png", "bad_url", "unsupported image URL scheme 'ftp'"),
    ],
)
async def test_bad_images_are_named(url: str, reason: str, says: str) -> None:
    err = await refused(chat(image(url)))
    assert (err.param, err.code) == ("messages.1.content.1", reason)
    assert err.message.startswith("messages[1].content[1]: ") and says in err.message


async def test_byte_and_pixel_limits_are_the_settings() -> None:
    err = await refused(chat(image(data_url(PNG))), max_bytes=len(PNG) - 1)
    assert err.code == "too_many_bytes" and f"over the limit of {len(PNG) - 1}" in err.message
    err = await refused(chat(image(data_url(PNG))), max_pixels=40 * 30 - 1)
    assert err.code == "too_many_pixels" and "40x30 = 1200 pixels" in err.message


async def test_the_first_bad_part_in_prompt_order_is_reported() -> None:
    messages = [
        ChatMessage(role="user", content=[image(data_url(PNG)), image(data_url(b"junk"))]),
        ChatMessage(role="user", content=[image(data_url(png_header_only(0, 0)))]),
    ]
    err = await refused(messages)
    assert err.param == "messages.0.content.1" and err.code == "corrupt"


# -- fetched ---------------------------------------------------------------------------


class Server:
    """An HTTP server on 127.0.0.1: /image.png, /redirect?to=URL, /slow."""

    def __init__(self) -> None:
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            path = head.split(" ", 2)[1]

            def send(status: str, headers: dict[str, str], body: bytes = b"") -> None:
                lines = [
                    f"HTTP/1.1 {status}",
                    *(f"{k}: {v}" for k, v in headers.items()),
                    "Connection: close",
                ]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

            route, _, target = path.partition("?to=")
            if route == "/image.png":
                send("200 OK", {"Content-Length": str(len(PNG)), "Content-Type": "image/png"}, PNG)
            elif route == "/redirect":
                send("302 Found", {"Location": target, "Content-Length": "0"})
            elif route == "/slow":
                send("200 OK", {"Content-Length": str(len(PNG))}, PNG[:10])
                await writer.drain()
                await asyncio.sleep(5)
            else:
                send("404 Not Found", {"Content-Length": "0"})
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    tcp = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    srv.port = tcp.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        tcp.close()
        await tcp.wait_closed()


def local(**settings: Any) -> dict[str, Any]:
    """Settings that let fetches reach our server (and nothing else internal)."""
    return {"allowed_domains": ("127.0.0.1", "10.0.0.1"), "allowed_networks": ("127.0.0.1/32",), **settings}


async def test_an_allowed_http_image_is_fetched(server: Server) -> None:
    (loaded,) = await load(chat(image(f"http://127.0.0.1:{server.port}/image.png")), **local())
    assert loaded.data == PNG and loaded.content_hash == content_hash(PNG)


async def test_a_domain_not_allowed_is_refused() -> None:
    err = await refused(chat(image("https://example.com/cat.png")), allowed_domains=("images.example.org",))
    assert err.code == "domain_not_allowed" and "'example.com' is not in the allowed domains" in err.message


async def test_nothing_is_fetched_without_allowed_domains(server: Server) -> None:
    err = await refused(chat(image(f"http://127.0.0.1:{server.port}/image.png")))
    assert err.code == "domain_not_allowed"


async def test_an_allowed_name_that_resolves_to_loopback_is_refused() -> None:
    err = await refused(chat(image("http://localhost:9/x.png")), allowed_domains=("localhost",))
    assert err.code == "address_not_allowed" and "a loopback address" in err.message
    assert err.param == "messages.1.content.1"


async def test_a_name_resolving_to_a_private_address_is_refused_by_resolver() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return {"internal.test": ["192.168.1.20"]}[host]

    settings = MediaSettings(allowed_domains=("internal.test",))
    fetcher = ImageFetcher(settings.fetch_policy(), resolver=resolver)
    with pytest.raises(APIError) as info:
        await load(chat(image("http://internal.test/x.png")), fetcher, allowed_domains=("internal.test",))
    assert (
        info.value.code == "address_not_allowed" and "192.168.1.20, a private address" in info.value.message
    )


async def test_a_redirect_to_a_private_address_is_refused(server: Server) -> None:
    url = f"http://127.0.0.1:{server.port}/redirect?to=http://10.0.0.1/x.png"
    err = await refused(chat(image(url)), **local())
    assert err.code == "address_not_allowed" and "10.0.0.1, a private address" in err.message


async def test_a_slow_fetch_times_out_naming_the_part(server: Server) -> None:
    slow = image(f"http://127.0.0.1:{server.port}/slow")
    err = await refused(chat(image(data_url(PNG)), slow), **local(fetch_timeout_s=0.3))
    assert err.param == "messages.1.content.2" and err.code == "timeout"
    assert "0.3 s" in err.message


async def test_an_http_error_is_named(server: Server) -> None:
    err = await refused(chat(image(f"http://127.0.0.1:{server.port}/missing.png")), **local())
    assert err.code == "fetch_failed" and "HTTP 404" in err.message


async def test_file_urls_only_under_the_allowed_directory(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    (root / "cat.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (loaded,) = await load(chat(image(f"file://{root}/cat.png")), local_media_path=str(root))
    assert loaded.data == PNG
    err = await refused(chat(image(f"file://{tmp_path}/secret.png")), local_media_path=str(root))
    assert err.code == "file_not_allowed"
    err = await refused(chat(image(f"file://{root}/../secret.png")), local_media_path=str(root))
    assert err.code == "file_not_allowed"
    err = await refused(chat(image(f"file://{root}/cat.png")))
    assert err.code == "bad_url" and "file: image URLs are disabled" in err.message
