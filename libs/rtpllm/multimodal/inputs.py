"""What a request carries for its images, from the API down to the model runner.

Plain data so it can later cross a process boundary: the metadata (hashes, placeholder
runs, grids) fits in a message, the tensors (pixels or embeddings) go over the data
plane. An image brings either its pixels, for the engine to encode with its own vision
tower, or its embeddings, computed elsewhere (a vision service); the engine needs only
one of the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rtpllm.kvcache.block_hash import image_extras


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One image of a prompt.

    `content_hash`: digest of the image (`image_input.content_hash` of its bytes). With
    the first placeholder offset it enters the block keys, so KV computed for one image
    is never reused for another behind the same placeholder tokens.
    `runs`: the (offset, length) runs of placeholder tokens in the prompt that the
    image's embedding rows fill, in order: one run for Qwen2-VL, one per tile for
    Idefics3 (tiles are separated by tile-marker tokens).
    `grid_thw`: Qwen2-VL's patch grid (t, h, w); M-RoPE positions need it even when the
    embeddings come precomputed.
    Payload, one of: `pixel_values` (+ `pixel_attention_mask` for Idefics3 tiles) as the
    family's processor makes them, or `embeddings` of shape (num_embeds, hidden).
    """

    content_hash: str
    runs: tuple[tuple[int, int], ...]
    grid_thw: tuple[int, int, int] | None = None
    pixel_values: torch.Tensor | None = None
    pixel_attention_mask: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None

    @property
    def offset(self) -> int:
        """Prompt position of the first placeholder token."""
        return self.runs[0][0]

    @property
    def end(self) -> int:
        """One past the last placeholder token."""
        offset, length = self.runs[-1]
        return offset + length

    @property
    def num_embeds(self) -> int:
        return sum(length for _, length in self.runs)

    def without_payload(self) -> ImageInput:
        """The metadata alone (what a message would carry)."""
        return ImageInput(self.content_hash, self.runs, self.grid_thw)


@dataclass(frozen=True, eq=False)
class MultimodalInputs:
    """The images of one prompt, in prompt order."""

    images: tuple[ImageInput, ...]
    _spans: tuple[tuple[str, int, int], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        spans = tuple((image.content_hash, image.offset, image.end) for image in self.images)
        object.__setattr__(self, "_spans", spans)

    @property
    def end(self) -> int:
        """One past the last placeholder token of the last image."""
        return self.images[-1].end if self.images else 0

    def block_extras(self, start: int, end: int) -> bytes:
        """Block-key extras of prompt block [start, end) (see block_hash.image_extras)."""
        return image_extras(self._spans, start, end)

    def check(self, token_ids: Sequence[int], image_token_id: int, hidden_size: int) -> None:
        """ValueError unless the images fit the prompt exactly: runs in order, inside the
        prompt, made of image tokens, covering every image token of the prompt; and each
        image has a payload of the right size."""
        covered = 0
        previous_end = 0
        for i, image in enumerate(self.images):
            if not image.runs:
                raise ValueError(f"image {i} has no placeholder tokens")
            for offset, length in image.runs:
                if length <= 0 or offset < previous_end or offset + length > len(token_ids):
                    raise ValueError(
                        f"image {i}: placeholder run ({offset}, {length}) is out of order or outside the prompt"
                    )
                if any(t != image_token_id for t in token_ids[offset : offset + length]):
                    raise ValueError(
                        f"image {i}: placeholder run ({offset}, {length}) holds tokens other than the image token"
                    )
                previous_end = offset + length
                covered += length
            if image.embeddings is not None:
                if tuple(image.embeddings.shape) != (image.num_embeds, hidden_size):
                    raise ValueError(
                        f"image {i}: embeddings of shape {tuple(image.embeddings.shape)}, "
                        f"expected ({image.num_embeds}, {hidden_size})"
                    )
            elif image.pixel_values is None:
                raise ValueError(f"image {i} has neither pixels nor embeddings")
        total = sum(1 for t in token_ids if t == image_token_id)
        if total != covered:
            raise ValueError(
                f"the prompt has {total} image placeholder tokens but its images fill {covered}; "
                "placeholders must come from images, not from prompt text"
            )
