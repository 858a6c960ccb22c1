"""The images of a chat request, loaded and checked at the gateway before the prompt is
built: OpenAI `image_url` content parts -> the encoded bytes, content hash and size of
each image, or a 400 that names the part and the problem.

Where an image may come from (`MediaSettings`, from the gateway's flags):

- `data:` URLs, always;
- `http(s)` URLs of the allowed domains only, through `ImageFetcher` (SSRF checks on
  every hop, bytes and time capped);
- `file:` URLs under the allowed directory only.

Every image is decoded once here, under the limits, so a corrupt, oversized or
unsupported one is refused before it costs an engine anything; what goes on is the
original bytes (the engine or vision service decodes them again to get the pixels:
pixels are far larger than the file and never cross NATS), and the size, from which the
prompt's placeholder tokens follow without preprocessing (VisionFamily.placeholder).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rtpllm.api.errors import APIError, bad_request
from rtpllm.api.requests import ChatMessage
from rtpllm.multimodal.fetch import FetchPolicy, ImageFetcher
from rtpllm.multimodal.image_input import ImageError, ImageLimits, decode_image, parse_data_url

if TYPE_CHECKING:
    from rtpllm.multimodal.families import VisionFamily

T = TypeVar("T")

# Images larger than this are base64-decoded and decoded off the event loop; below it
# the thread hop costs more than the work.
_THREAD_BYTES = 32 * 1024
# The one `detail` value we honour: the models see every image at the resolution their
# processor picks, so "low"/"high" would be accepted and ignored (project rule: no).
_DETAILS = ("auto",)


@dataclass(frozen=True)
class MediaSettings:
    """Where images may come from and how large they may be (the gateway's flags).

    `allowed_domains`: hosts whose http(s) images may be fetched (`*.example.com` for
    subdomains); empty: no http(s) fetching. `allowed_networks`: CIDRs exempt from the
    ban on loopback, private and link-local addresses (an internal image store).
    `local_media_path`: the directory `file:` URLs may read; None: no `file:` URLs.
    `max_bytes` caps one image's encoded size, `max_pixels` its declared width x height
    (checked from the header before decoding), `max_images` the images of one request;
    `fetch_timeout_s` bounds each fetch and the loading of all of a request's images.
    """

    allowed_domains: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    local_media_path: str | None = None
    max_images: int = 8
    max_pixels: int = ImageLimits.max_pixels
    max_bytes: int = ImageLimits.max_bytes
    fetch_timeout_s: float = 10.0

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_bytes, max_pixels=self.max_pixels)

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(
            allowed_domains=frozenset(self.allowed_domains),
            allowed_networks=self.allowed_networks,
            file_root=Path(self.local_media_path) if self.local_media_path else None,
            max_bytes=self.max_bytes,
            timeout_s=self.fetch_timeout_s,
        )


@dataclass(frozen=True)
class ImagePart:
    """One `image_url` content part: where it is in the request, and its URL."""

    message: int
    part: int
    url: str

    @property
    def where(self) -> str:
        """How a message names the part: `messages[1].content[2]`."""
        return f"messages[{self.message}].content[{self.part}]"

    @property
    def param(self) -> str:
        """The OpenAI error `param` of the part: `messages.1.content.2`."""
        return f"messages.{self.message}.content.{self.part}"


@dataclass(frozen=True)
class LoadedImage:
    """An image that passed every check. Not the decoded pixels: those are dropped at
    once (up to max_pixels x 3 bytes each); the prompt needs only the size, and the
    encoder decodes `data` again."""

    part: ImagePart
    data: bytes  # the encoded image as fetched or sent in the data: URL
    content_hash: str  # image_input.content_hash(data), as DecodedImage.content_hash
    width: int  # after EXIF orientation, as the encoder will see it
    height: int
    format: str


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image_url"


def image_parts(messages: Sequence[ChatMessage]) -> list[ImagePart]:
    """Every `image_url` part of the messages in prompt order, its shape checked: either
    `{"type": "image_url", "image_url": {"url": ..., "detail": "auto"}}` or
    `{"type": "image_url", "image_url": "<url>"}`."""
    out: list[ImagePart] = []
    for m, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for p, part in enumerate(message.content):
            if is_image_part(part):
                out.append(_image_part(m, p, part["image_url"] if "image_url" in part else None))
    return out


def _image_part(m: int, p: int, spec: Any) -> ImagePart:
    where, param = f"messages[{m}].content[{p}].image_url", f"messages.{m}.content.{p}.image_url"
    if isinstance(spec, dict):
        detail = spec.get("detail")
        if detail is not None and detail not in _DETAILS:
            raise bad_request(
                f"{where}.detail: only 'auto' is supported (every image is seen at the resolution the "
                f"model's processor picks), got {detail!r}",
                f"{param}.detail",
            )
        url = spec.get("url")
        where, param = f"{where}.url", f"{param}.url"
    else:
        url = spec
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}: expected an image URL string, got {_shown(url)}", param)
    return ImagePart(m, p, url)


class ImageLoader:
    """Loads the images of chat requests for one served model under `settings`.

    `family` is the model's vision family; None for a text model, whose requests with
    images get a 400. One per gateway: it keeps the fetcher (an HTTP transport), made on
    the first http(s) or file: URL unless given (under the settings' policy); `aclose()`
    at shutdown.
    """

    def __init__(
        self,
        settings: MediaSettings,
        model: str,
        family: VisionFamily | None = None,
        fetcher: ImageFetcher | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.family = family
        self._fetcher = fetcher  # given: one with its own resolver or TLS trust (tests, private DNS)

    async def aclose(self) -> None:
        if self._fetcher is not None:
            await self._fetcher.aclose()
            self._fetcher = None

    async def load(self, messages: Sequence[ChatMessage]) -> list[LoadedImage]:
        """The request's images in prompt order, fetched and decoded concurrently within
        `fetch_timeout_s` in all. APIError 400 naming the part for any failure (the first
        in prompt order when several fail)."""
        parts = image_parts(messages)
        if not parts:
            return []
        if self.family is None:
            raise bad_request(
                f"{parts[0].where}: model {self.model!r} does not take images",
                parts[0].param,
                "images_not_supported",
            )
        limit = self.settings.max_images
        if len(parts) > limit:
            raise bad_request(
                f"the request has {len(parts)} images, more than the {limit} this server accepts per request",
                "messages",
                "too_many_images",
            )
        tasks = [asyncio.create_task(self._load_one(part)) for part in parts]
        try:
            _, pending = await asyncio.wait(
                tasks, timeout=self.settings.fetch_timeout_s, return_when=asyncio.FIRST_EXCEPTION
            )
        finally:
            # Our caller cancelled, one image failed or time is up: nothing keeps running
            # for a request that is already answered.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:  # prompt order: the first failed part is the one reported
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if pending:
            first = next(part for part, task in zip(parts, tasks, strict=True) if task in pending)
            raise bad_request(
                f"{first.where}: loading the request's images took more than "
                f"{self.settings.fetch_timeout_s:g} s",
                first.param,
                "timeout",
            )
        return [task.result() for task in tasks]

    async def _load_one(self, part: ImagePart) -> LoadedImage:
        try:
            if part.url[:5].lower() == "data:":
                _, data = await _maybe_thread(
                    len(part.url), parse_data_url, part.url, self.settings.max_bytes
                )
            else:
                data = await self._fetcher_for().fetch(part.url)
            decoded = await _maybe_thread(len(data), decode_image, data, self.settings.limits)
        except ImageError as exc:
            raise _image_error(part, exc) from None
        loaded = LoadedImage(part, data, decoded.content_hash, decoded.width, decoded.height, decoded.format)
        decoded.image.close()
        return loaded

    def _fetcher_for(self) -> ImageFetcher:
        if self._fetcher is None:
            self._fetcher = ImageFetcher(self.settings.fetch_policy())
        return self._fetcher


def _image_error(part: ImagePart, exc: ImageError) -> APIError:
    return bad_request(f"{part.where}: {exc}", part.param, exc.reason)


async def _maybe_thread(size: int, fn: Callable[..., T], *args: Any) -> T:
    if size > _THREAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
