"""Image bytes and data: URLs: what decodes (and equals HF's loading), and what is refused
with which named problem."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.image_utils import load_image as hf_load_image

from rtpllm.multimodal.image_input import (
    ImageError,
    ImageLimits,
    content_hash,
    decode_data_url,
    decode_image,
    parse_data_url,
)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def encode(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and which carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def reason(exc_info: pytest.ExceptionInfo[ImageError]) -> str:
    return exc_info.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_supported_formats_decode_to_rgb_like_hf(fmt: str) -> None:
    data = encode(random_image(37, 23), fmt)
    decoded = decode_image(data)
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (37, 23)
    assert decoded.format == fmt
    assert decoded.num_bytes == len(data)
    expected = hf_load_image(data_url(data, f"image/{fmt.lower()}"))
    assert np.array_equal(np.asarray(decoded.image), np.asarray(expected))


def test_content_hash_is_blake2b_of_the_raw_bytes() -> None:
    data = encode(random_image(8, 8), "PNG")
    assert (
        decode_image(data).content_hash
        == hashlib.blake2b(data, digest_size=32).hexdigest()
        == content_hash(data)
    )
    # Same pixels, different bytes (another encoder setting): a different key.
    other = encode(random_image(8, 8), "PNG", compress_level=0)
    assert decode_image(other).content_hash != decode_image(data).content_hash


def test_exif_orientation_is_applied_like_hf_load_image() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(random_image(40, 20), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data)
    assert (decoded.width, decoded.height) == (20, 40)
    assert np.array_equal(np.asarray(decoded.image), np.asarray(hf_load_image(data_url(data, "image/jpeg"))))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white_like_hf_processors(mode: str) -> None:
    image = random_image(16, 12, mode, seed=3)
    decoded = decode_image(encode(image, "PNG"))
    assert np.array_equal(np.asarray(decoded.image), hf_convert_to_rgb(image, return_numpy=True))


def test_palette_transparency_is_composited_like_hf_processors() -> None:
    image = random_image(16, 12, "RGB", seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 0
    data = encode(image, "PNG", transparency=0)
    reopened = Image.open(io.BytesIO(data))
    assert np.array_equal(
        np.asarray(decode_image(data).image), hf_convert_to_rgb(reopened, return_numpy=True)
    )


def test_corrupt_bytes_are_refused() -> None:
    with pytest.raises(ImageError, match="cannot decode image") as exc:
        decode_image(np.random.default_rng(0).bytes(500))
    assert reason(exc) == "corrupt"


def test_truncated_image_is_refused_at_decode() -> None:
    data = encode(random_image(64, 64), "JPEG")
    with pytest.raises(ImageError, match="cannot decode image") as exc:
        decode_image(data[: len(data) // 2])
    assert reason(exc) == "corrupt"


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(ImageError, match="empty") as exc:
        decode_image(b"")
    assert reason(exc) == "corrupt"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("png width 0", png_header_only(0, 10)),
        ("png height 0", png_header_only(10, 0)),
        (
            "bmp width 0",
            (lambda b: b[:18] + struct.pack("<i", 0) + b[22:])(encode(random_image(4, 4), "BMP")),
        ),
        (
            "jpeg height 0",
            (lambda b: b[: b.index(b"\xff\xc0") + 5] + b"\x00\x00" + b[b.index(b"\xff\xc0") + 7 :])(
                encode(random_image(4, 4), "JPEG")
            ),
        ),
    ],
)
def test_zero_size_images_are_named(name: str, data: bytes) -> None:
    with pytest.raises(ImageError, match="zero size") as exc:
        decode_image(data)
    assert reason(exc) == "zero_size"


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # 100 megapixels declared in ~60 bytes with no pixel data at all: a decode attempt
    # would fail as corrupt, so "too many pixels" proves the header check came first.
    data = png_header_only(10_000, 10_000)
    with pytest.raises(ImageError, match="10000x10000 = 100000000 pixels") as exc:
        decode_image(data)
    assert reason(exc) == "too_many_pixels"


def test_pixel_limit_applies_to_formats_without_our_header_reader() -> None:
    data = encode(random_image(40, 30), "WEBP")
    with pytest.raises(ImageError, match="40x30 = 1200 pixels, over the limit of 1000") as exc:
        decode_image(data, ImageLimits(max_pixels=1000))
    assert reason(exc) == "too_many_pixels"


def test_pil_decompression_bomb_error_becomes_an_image_error() -> None:
    # Our own limit lifted: PIL's bomb guard (2 x MAX_IMAGE_PIXELS) is the one that fires.
    limits = ImageLimits(max_pixels=10**12)
    with pytest.raises(ImageError, match="too many pixels") as exc:
        decode_image(png_header_only(20_000, 20_000), limits)
    assert reason(exc) == "too_many_pixels"


def test_byte_limit() -> None:
    data = encode(random_image(32, 32), "PNG")
    with pytest.raises(ImageError, match=f"image is {len(data)} bytes, over the limit of 100") as exc:
        decode_image(data, ImageLimits(max_bytes=100))
    assert reason(exc) == "too_many_bytes"


def test_unsupported_formats_are_named() -> None:
    with pytest.raises(ImageError, match="unsupported image format TIFF") as exc:
        decode_image(encode(random_image(8, 8), "TIFF"))
    assert reason(exc) == "unsupported_format"
    with pytest.raises(ImageError, match="unsupported image format JPEG; allowed: PNG"):
        decode_image(encode(random_image(8, 8), "JPEG"), ImageLimits(formats=frozenset({"PNG"})))


def test_data_url_round_trip_and_tolerated_variants() -> None:
    data = encode(random_image(10, 10), "PNG")
    encoded = base64.b64encode(data).decode()
    assert parse_data_url(f"data:image/png;base64,{encoded}") == ("image/png", data)
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert parse_data_url(f"DATA:Image/PNG;base64,{wrapped}")[1] == data
    assert parse_data_url(f"data:image/png;base64,{encoded.rstrip('=')}")[1] == data
    assert parse_data_url(f"data:;base64,{encoded}") == ("image/*", data)
    decoded = decode_data_url(f"data:image/png;base64,{encoded}")
    assert decoded.content_hash == content_hash(data)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("image/png;base64,AAAA", "malformed data URL"),
        ("data:image/png;base64", "malformed data URL"),
        ("data:image/png,AAAA", "must be base64"),
        ("data:text/plain;base64,AAAA", "'text/plain' is not an image type"),
        ("data:image/png;base64,AA$A", "not valid base64"),
        ("data:image/png;base64,ÄÄÄÄ", "not valid base64"),
        ("data:image/png;base64,", "carries no data"),
    ],
)
def test_bad_data_urls_are_named(url: str, message: str) -> None:
    with pytest.raises(ImageError, match=message) as exc:
        parse_data_url(url)
    assert reason(exc) == "bad_data_url"


def test_data_url_size_is_checked_before_decoding() -> None:
    url = "data:image/png;base64," + "A" * 4000  # would decode to 3000 bytes
    with pytest.raises(ImageError, match="about 3000 bytes, over the limit of 1000") as exc:
        parse_data_url(url, max_bytes=1000)
    assert reason(exc) == "too_many_bytes"
