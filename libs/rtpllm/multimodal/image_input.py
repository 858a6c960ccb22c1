"""Decode and validate untrusted image bytes and `data:` URLs.

Every problem raises `ImageError` with a message that names it, so the API layer can
answer 400 with that message and keep serving. Limits are checked in order of cost: the
byte count before anything is parsed, the declared pixel count from the header before
any pixel is decoded (a 50 KB PNG can declare 100 000 x 100 000 pixels), and only then
the full decode.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import struct
from dataclasses import dataclass, field

from PIL import Image, ImageOps, UnidentifiedImageError

# Formats a chat request may carry. Others (TIFF, PSD, EPS, ICO, ...) are refused up
# front: each extra PIL plugin is more parser surface exposed to untrusted bytes, and
# EPS would even start Ghostscript.
DEFAULT_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})


class ImageError(ValueError):
    """An image the server will not accept; the message names the problem.

    `reason` is a short stable code (`too_many_bytes`, `too_many_pixels`, `zero_size`,
    `unsupported_format`, `corrupt`, `bad_data_url`, ...) for metrics and tests; the
    message is for the client.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """What a single image may be. Defaults admit any ordinary photo (50 MP, 20 MiB)."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    formats: frozenset[str] = field(default=DEFAULT_FORMATS)


@dataclass(frozen=True)
class DecodedImage:
    """A validated image in RGB and the hash of the bytes it came from."""

    image: Image.Image
    format: str
    num_bytes: int
    content_hash: str

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def content_hash(data: bytes) -> str:
    """Hex blake2b-256 of the raw bytes: the key for the embedding cache and block keys."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """Validate and decode image bytes into an RGB `PIL.Image`.

    EXIF orientation is applied (as HF's `load_image` does) and transparency is
    composited onto white (as HF's `convert_to_rgb` does), so the pixels equal what the
    HF processor would see for the same file. An animated image yields its first frame.
    """
    if len(data) == 0:
        raise ImageError("image is empty (0 bytes)", "corrupt")
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"image is {len(data)} bytes, over the limit of {limits.max_bytes}", "too_many_bytes"
        )

    declared = _declared_size(data)
    if declared is not None:
        _check_size(*declared, limits)

    try:
        # `formats` restricts which plugins may even look at the bytes.
        image = Image.open(io.BytesIO(data), formats=sorted(limits.formats))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image declares too many pixels: {exc}", "too_many_pixels") from exc
    except UnidentifiedImageError as exc:
        sniffed = _sniff_format(data)
        if sniffed is not None and sniffed not in limits.formats:
            allowed = ", ".join(sorted(limits.formats))
            raise ImageError(
                f"unsupported image format {sniffed}; allowed: {allowed}", "unsupported_format"
            ) from exc
        raise ImageError("cannot decode image: not a valid image in a supported format", "corrupt") from exc
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise ImageError(f"cannot decode image: {exc}", "corrupt") from exc

    with image:
        # PIL has only parsed the header so far: this check precedes any pixel decoding.
        _check_size(image.width, image.height, limits)
        fmt = image.format or "unknown"
        try:
            image.load()
            rgb = to_rgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError as exc:
            raise ImageError(f"image declares too many pixels: {exc}", "too_many_pixels") from exc
        except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
            # Truncated or corrupt pixel data surfaces only at load time.
            raise ImageError(f"cannot decode image: {exc}", "corrupt") from exc
    return DecodedImage(image=rgb, format=fmt, num_bytes=len(data), content_hash=content_hash(data))


_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")


def parse_data_url(url: str, max_bytes: int = ImageLimits.max_bytes) -> tuple[str, bytes]:
    """Split a `data:image/...;base64,...` URL into (media type, decoded bytes).

    The size is checked from the encoded length before decoding, so a huge URL costs no
    second copy. Line breaks and missing `=` padding are tolerated (some clients wrap or
    strip them); any other non-base64 character is an error.
    """
    match = _DATA_URL.match(url)
    if match is None:
        raise ImageError("malformed data URL: expected 'data:<media type>;base64,<data>'", "bad_data_url")
    mime = match["mime"].strip().lower()
    params = [p.strip().lower() for p in match["params"].split(";") if p.strip()]
    if "base64" not in params:
        raise ImageError("data URL must be base64-encoded (';base64,')", "bad_data_url")
    if mime and not mime.startswith("image/"):
        raise ImageError(f"data URL media type {mime!r} is not an image type", "bad_data_url")

    payload = _WHITESPACE.sub(b"", url[match.end() :].encode("ascii", errors="replace"))
    if len(payload) // 4 * 3 > max_bytes:
        raise ImageError(
            f"data URL carries about {len(payload) // 4 * 3} bytes, over the limit of {max_bytes}",
            "too_many_bytes",
        )
    payload += b"=" * (-len(payload) % 4)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"data URL is not valid base64: {exc}", "bad_data_url") from exc
    if not data:
        raise ImageError("data URL carries no data", "bad_data_url")
    return mime or "image/*", data


def decode_data_url(url: str, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """`parse_data_url` then `decode_image`."""
    _, data = parse_data_url(url, limits.max_bytes)
    return decode_image(data, limits)


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})", "zero_size")
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}",
            "too_many_pixels",
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited onto white, the same rule as HF's convert_to_rgb."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as written in the header of a PNG, GIF, BMP or JPEG; None otherwise.

    PIL refuses zero-size PNG/BMP/JPEG files as 'cannot identify', which would hide the
    real problem from the client; reading the header ourselves lets us name it.
    """
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        if data[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack("<HH", data[6:10])
            return width, height
        if data.startswith(b"BM"):
            (header_size,) = struct.unpack("<I", data[14:18])
            if header_size == 12:
                width, height = struct.unpack("<HH", data[18:22])
                return width, height
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)  # negative height means top-down rows
        if data.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
    except struct.error:
        return None  # truncated header: let PIL report it
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xDA)):  # standalone markers carry no length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    return None


# Magic numbers of formats we refuse, so the client hears "unsupported format TIFF"
# rather than "corrupt".
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"8BPS", 0, "PSD"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"%!PS", 0, "EPS"),
    (b"\xc5\xd0\xd3\xc6", 0, "EPS"),
    (b"%PDF", 0, "PDF"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG2000"),
    (b"qoif", 0, "QOI"),
    (b"ftypavif", 4, "AVIF"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"\x89PNG", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"GIF8", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"WEBP", 8, "WEBP"),
    (b"<svg", 0, "SVG"),
    (b"<?xml", 0, "SVG/XML"),
)


def _sniff_format(data: bytes) -> str | None:
    for magic, offset, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None
