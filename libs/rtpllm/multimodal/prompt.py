"""Prompts with images: each image placeholder the chat template wrote becomes the tokens
the model expects for that image, and the request gets the `MultimodalInputs` to match.

The expansion works on token ids, after tokenization, not on text: the placeholder and
both ends of every expansion are special tokens, so the ids equal those of HF's
processors (which expand the text, then tokenize), and text typed by a user can never
be expanded (`Tokenizer.encode_chat` tokenizes user text without special tokens).

Two entry points share the splicing: `expand_image_prompt` preprocesses the images too
(in-process engines), `expand_image_placeholders` needs only their sizes (the gateway,
which routes and hashes the prompt but leaves the pixels to whoever encodes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from rtpllm.multimodal.families import VisionFamily
from rtpllm.multimodal.image_input import DecodedImage
from rtpllm.multimodal.inputs import ImageInput, MultimodalInputs
from rtpllm.tokenizer import Tokenizer


def pil_content_hash(image: Image.Image) -> str:
    """Hex blake2b-256 of a decoded image's mode, size and pixels: the content hash of an
    image handed over as a `PIL.Image` (no bytes to hash)."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(f"pil:{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ImagePlacement:
    """Where one image sits in an expanded prompt: its placeholder runs ((offset,
    length), as `ImageInput.runs`) and Qwen2-VL's grid."""

    runs: tuple[tuple[int, int], ...]
    grid_thw: tuple[int, int, int] | None

    @property
    def offset(self) -> int:
        return self.runs[0][0]

    @property
    def end(self) -> int:
        offset, length = self.runs[-1]
        return offset + length


def expand_image_prompt(
    family: VisionFamily,
    tokenizer: Tokenizer,
    token_ids: Sequence[int],
    images: Sequence[DecodedImage | Image.Image],
) -> tuple[list[int], MultimodalInputs]:
    """Replace the i-th image token of `token_ids` (one per image, as the chat template
    writes them) with image i's placeholder tokens; preprocess the images.

    ValueError when the prompt's image tokens and the images do not pair up.
    """
    _check_slots(family, token_ids, len(images))
    processed = []
    digests = []
    for image in images:
        if isinstance(image, DecodedImage):
            pil, digest = image.image, image.content_hash
        else:
            pil, digest = image, pil_content_hash(image)
        processed.append(family.process(pil, tokenizer))
        digests.append(digest)
    out, placements = _splice(family, token_ids, [(p.token_ids, p.grid_thw) for p in processed])
    items = tuple(
        ImageInput(
            content_hash=digest,
            runs=placement.runs,
            grid_thw=placement.grid_thw,
            pixel_values=p.pixel_values,
            pixel_attention_mask=p.pixel_attention_mask,
        )
        for digest, placement, p in zip(digests, placements, processed, strict=True)
    )
    return out, MultimodalInputs(items)


def expand_image_placeholders(
    family: VisionFamily,
    tokenizer: Tokenizer,
    token_ids: Sequence[int],
    sizes: Sequence[tuple[int, int]],
) -> tuple[list[int], list[ImagePlacement]]:
    """`expand_image_prompt` from the images' (width, height) alone: the same expanded ids
    and, per image, the same runs and grid, with no pixel touched.

    ValueError when the prompt's image tokens and the images do not pair up.
    """
    _check_slots(family, token_ids, len(sizes))
    return _splice(family, token_ids, [family.placeholder(w, h, tokenizer) for w, h in sizes])


def _check_slots(family: VisionFamily, token_ids: Sequence[int], count: int) -> None:
    slots = sum(1 for t in token_ids if t == family.image_token_id)
    if slots != count:
        raise ValueError(f"the prompt has {slots} {family.image_token} placeholders for {count} images")


def _splice(
    family: VisionFamily,
    token_ids: Sequence[int],
    expansions: Sequence[tuple[Sequence[int], tuple[int, int, int] | None]],
) -> tuple[list[int], list[ImagePlacement]]:
    """`token_ids` with its i-th image token replaced by expansion i's ids, and where each
    expansion's image-token runs landed."""
    slots = [i for i, t in enumerate(token_ids) if t == family.image_token_id]
    out: list[int] = []
    placements: list[ImagePlacement] = []
    cursor = 0
    for slot, (ids, grid) in zip(slots, expansions, strict=True):
        out.extend(token_ids[cursor:slot])
        placements.append(ImagePlacement(_runs(ids, family.image_token_id, base=len(out)), grid))
        out.extend(ids)
        cursor = slot + 1
    out.extend(token_ids[cursor:])
    return out, placements


def _runs(token_ids: Sequence[int], image_token_id: int, base: int) -> tuple[tuple[int, int], ...]:
    """(offset + base, length) of every maximal run of `image_token_id`."""
    runs: list[tuple[int, int]] = []
    start = -1
    for i, t in enumerate([*token_ids, -1]):
        if t == image_token_id and start < 0:
            start = i
        elif t != image_token_id and start >= 0:
            runs.append((base + start, i - start))
            start = -1
    return tuple(runs)
