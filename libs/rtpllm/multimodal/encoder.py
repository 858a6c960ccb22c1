"""From an image on the wire (ImageSpec: encoded bytes + where it sits in the prompt) to
what the language model takes: pixels ready for the tower, or the tower's embeddings.

Used by both places that encode: the vision service (rtpllm.serving.vision_server) and an
engine that encodes its requests' images itself. Every image is checked again here, not
trusted: its bytes must hash to the content hash it claims (the hash names its embedding
in every cache), it must decode under the limits, and its preprocessing must give
exactly the placeholder runs and grid the gateway expanded the prompt with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rtpllm.multimodal.families import VisionFamily, load_vision_family
from rtpllm.multimodal.image_input import ImageLimits, content_hash, decode_image
from rtpllm.multimodal.inputs import ImageInput
from rtpllm.protocol.messages import ImageSpec
from rtpllm.tokenizer import Tokenizer


class ImageMismatch(ValueError):
    """An image whose bytes, size or placeholders disagree with what its spec says."""


def image_from_spec(family: VisionFamily, tokenizer: Tokenizer, spec: ImageSpec, limits: ImageLimits = ImageLimits()) -> ImageInput:
    """Decode and preprocess one image; ValueError (ImageError, ImageMismatch) when it is
    bad or does not fit its spec. CPU work of tens of ms: call it off the event loop."""
    if not spec.data:
        raise ImageMismatch(f"image {spec.content_hash[:12]} came without its bytes")
    if content_hash(spec.data) != spec.content_hash:
        raise ImageMismatch(f"image {spec.content_hash[:12]}: its bytes do not hash to its content hash")
    decoded = decode_image(spec.data, limits)
    processed = family.process(decoded.image, tokenizer)
    expected = sum(length for _, length in spec.runs)
    got = sum(1 for t in processed.token_ids if t == family.image_token_id)
    if got != expected or processed.grid_thw != (tuple(spec.grid_thw) if spec.grid_thw is not None else None):
        raise ImageMismatch(
            f"image {spec.content_hash[:12]}: preprocessing gives {got} placeholder tokens (grid "
            f"{processed.grid_thw}), the prompt has {expected} (grid {spec.grid_thw})"
        )
    return ImageInput(
        content_hash=spec.content_hash,
        runs=tuple((int(o), int(n)) for o, n in spec.runs),
        grid_thw=processed.grid_thw,
        pixel_values=processed.pixel_values,
        pixel_attention_mask=processed.pixel_attention_mask,
    )


def metadata_from_spec(spec: ImageSpec) -> ImageInput:
    """The image's metadata alone (for embeddings that come from elsewhere)."""
    grid = tuple(int(x) for x in spec.grid_thw) if spec.grid_thw is not None else None
    return ImageInput(spec.content_hash, tuple((int(o), int(n)) for o, n in spec.runs), grid)  # type: ignore[arg-type]


class VisionEncoder:
    """A family's tower with its preprocessing: `prepare` (CPU, thread-safe) and
    `encode` (one batched tower call; one caller at a time)."""

    def __init__(self, family: VisionFamily, tower: nn.Module, tokenizer: Tokenizer, hidden_size: int, dtype: torch.dtype) -> None:
        self.family = family
        self.tower = tower
        self.tokenizer = tokenizer
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = next(tower.parameters()).device

    @classmethod
    def load(cls, model_dir: str | Path, dtype: torch.dtype, device: str, random_seed: int | None = None) -> VisionEncoder:
        """The tower of a vision-language checkpoint (random weights from `random_seed`,
        drawn as an engine with the same seed draws them)."""
        from rtpllm.models.config import ModelConfig

        root = Path(model_dir)
        config = ModelConfig.from_dir(root)
        family = load_vision_family(root, config)
        if family is None:
            raise ValueError(f"{root} is not a vision-language model: it has no vision tower")
        tower = family.build_tower(root, dtype, device, random_seed)
        return cls(family, tower, Tokenizer.from_dir(root), config.hidden_size, dtype)

    def prepare(self, spec: ImageSpec, limits: ImageLimits = ImageLimits()) -> ImageInput:
        return image_from_spec(self.family, self.tokenizer, spec, limits)

    @torch.inference_mode()
    def encode(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        """Embeddings [num_embeds, hidden] of each image, in one batched tower call."""
        out = self.family.encode(self.tower, images)
        for image, rows in zip(images, out, strict=True):
            if tuple(rows.shape) != (image.num_embeds, self.hidden_size):
                raise ImageMismatch(
                    f"image {image.content_hash[:12]}: the tower gave {tuple(rows.shape)} rows, the prompt has {image.num_embeds}"
                )
        return [rows.to(self.dtype) for rows in out]
