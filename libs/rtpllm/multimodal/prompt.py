"""Prompts with images: each image placeholder the chat template wrote becomes the tokens
the model expects for that image, and the request gets the `MultimodalInputs` to match.

The expansion works on token ids, after tokenization, not on text: the placeholder and
both ends of every expansion are special tokens, so the ids equal those of HF's
processors (which expand the text, then tokenize), and text typed by a user can never
be expanded (`Tokenizer.encode_chat` tokenizes user text without special tokens).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

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
    slots = [i for i, t in enumerate(token_ids) if t == family.image_token_id]
    if len(slots) != len(images):
        raise ValueError(
            f"the prompt has {len(slots)} {family.image_token} placeholders for {len(images)} images"
        )
    out: list[int] = []
    items: list[ImageInput] = []
    cursor = 0
    for slot, image in zip(slots, images, strict=True):
        if isinstance(image, DecodedImage):
            pil, digest = image.image, image.content_hash
        else:
            pil, digest = image, pil_content_hash(image)
        out.extend(token_ids[cursor:slot])
        processed = family.process(pil, tokenizer)
        runs = _runs(processed.token_ids, family.image_token_id, base=len(out))
        out.extend(processed.token_ids)
        items.append(
            ImageInput(
                content_hash=digest,
                runs=runs,
                grid_thw=processed.grid_thw,
                pixel_values=processed.pixel_values,
                pixel_attention_mask=processed.pixel_attention_mask,
            )
        )
        cursor = slot + 1
    out.extend(token_ids[cursor:])
    return out, MultimodalInputs(tuple(items))


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
