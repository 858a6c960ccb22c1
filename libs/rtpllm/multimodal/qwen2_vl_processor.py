"""Qwen2-VL image preprocessing and prompt expansion, equal to HF's PIL image processor.

An image is resized so both sides are multiples of `patch_size * merge_size` (28) and
its area lies in [min_pixels, max_pixels] (`smart_resize`), rescaled to [0, 1],
normalized with the CLIP mean/std, and cut into 14x14 patches. Each patch is repeated
`temporal_patch_size` times (an image is a one-frame video to the Conv3d patch embed)
and flattened, in merge-block order: the 2x2 patches that the merger fuses into one
language-model token are adjacent rows. `grid_thw` is (1, H/14, W/14) and the image
takes H*W/(14*14*4) placeholder tokens.

The arithmetic follows HF's exactly (uint8 resize in PIL, rescale in float64 then cast,
normalize in float32) so `pixel_values` match bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from rtpllm.multimodal.image_input import ImageError, to_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

# Beyond this, smart_resize would squeeze one side below a patch; HF refuses it too.
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class Qwen2VLImageConfig:
    """Preprocessing parameters (HF `preprocessor_config.json`); defaults are Qwen2-VL's."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf(cls, preprocessor_config: Mapping[str, Any]) -> Qwen2VLImageConfig:
        """Read HF's preprocessor config; `size` wins over the legacy min/max_pixels keys."""
        cfg = preprocessor_config
        size = cfg.get("size") or {}
        return cls(
            min_pixels=int(size.get("shortest_edge", cfg.get("min_pixels", cls.min_pixels))),
            max_pixels=int(size.get("longest_edge", cfg.get("max_pixels", cls.max_pixels))),
            patch_size=int(cfg.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(cfg.get("merge_size", cls.merge_size)),
            image_mean=tuple(cfg.get("image_mean", cls.image_mean)),  # type: ignore[arg-type]
            image_std=tuple(cfg.get("image_std", cls.image_std)),  # type: ignore[arg-type]
            rescale_factor=float(cfg.get("rescale_factor", cls.rescale_factor)),
        )


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """The (height, width) Qwen2-VL resizes to: multiples of `factor`, area within
    [min_pixels, max_pixels], aspect ratio as close to the original as rounding allows."""
    if min(height, width) <= 0:
        raise ImageError(f"image has zero size ({width}x{height})", "zero_size")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 exceeds {MAX_ASPECT_RATIO}:1",
            "aspect_ratio",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        # Shrink both sides by the same ratio, rounding down so the cap holds.
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class Qwen2VLImageInputs:
    """Preprocessed images, concatenated in request order.

    `pixel_values`: (total patches, C * temporal_patch_size * patch_size**2) float32.
    `image_grid_thw`: (num images, 3) int64, patches per image along t, h, w.
    `num_image_tokens`: placeholder tokens (= merged embeddings) per image.
    """

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    num_image_tokens: list[int]


class Qwen2VLImageProcessor:
    """Turns RGB images into Qwen2-VL `pixel_values` and `image_grid_thw`."""

    def __init__(self, config: Qwen2VLImageConfig | None = None) -> None:
        self.config = config or Qwen2VLImageConfig()
        c = self.config
        mean = torch.tensor(c.image_mean, dtype=torch.float32).view(-1, 1)
        std = torch.tensor(c.image_std, dtype=torch.float32).view(-1, 1)
        # Every (channel, byte value) pair's output, computed once in HF's numpy order of
        # operations: rescale in float64 then cast, normalize in float32. (Multiplying by
        # a float32 1/255 instead changes the last bit of some values, and the outputs
        # would only be close, not equal.) A lookup per pixel is then the whole
        # normalization: 6x faster than doing the arithmetic per pixel, bit for bit equal.
        scaled = (torch.arange(256, dtype=torch.float64) * c.rescale_factor).to(torch.float32)
        self._lut = (scaled.view(1, 256) - mean) / std  # (C, 256)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        c = self.config
        return smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of an image of this size, without touching pixels."""
        resized_h, resized_w = self.resized_size(height, width)
        return 1, resized_h // self.config.patch_size, resized_w // self.config.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens an image of this size expands to (known before decoding)."""
        t, h, w = self.grid_thw(height, width)
        return t * h * w // self.config.merge_size**2

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One RGB image -> (flattened patches, grid_thw)."""
        c = self.config
        resized_h, resized_w = self.resized_size(image.height, image.width)
        resized = to_rgb(image).resize((resized_w, resized_h), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(resized)).permute(2, 0, 1)  # (C, H, W) uint8
        channels = pixels.shape[0]
        normalized = self._lut.gather(1, pixels.reshape(channels, -1).long()).view(channels, resized_h, resized_w)
        return self._patchify(normalized), (1, resized_h // c.patch_size, resized_w // c.patch_size)

    def __call__(self, images: Sequence[Image.Image]) -> Qwen2VLImageInputs:
        patches: list[torch.Tensor] = []
        grids: list[tuple[int, int, int]] = []
        for image in images:
            flat, grid = self.preprocess(image)
            patches.append(flat)
            grids.append(grid)
        merge = self.config.merge_size**2
        return Qwen2VLImageInputs(
            pixel_values=torch.cat(patches) if patches else torch.empty(0, self.patch_dim),
            image_grid_thw=torch.tensor(grids, dtype=torch.int64).view(-1, 3),
            num_image_tokens=[t * h * w // merge for t, h, w in grids],
        )

    @property
    def patch_dim(self) -> int:
        c = self.config
        return len(c.image_mean) * c.temporal_patch_size * c.patch_size**2

    def _patchify(self, image: torch.Tensor) -> torch.Tensor:
        c = self.config
        channels, height, width = image.shape
        p, m = c.patch_size, c.merge_size
        grid_h, grid_w = height // p, width // p
        # (C, H, W) -> (C, blocks_h, m, p, blocks_w, m, p) -> block-major
        # (blocks_h, blocks_w, m, m, C, p, p), so the m*m patches of a merge block sit together.
        blocks = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        frames = blocks.unsqueeze(5).expand(*blocks.shape[:5], c.temporal_patch_size, p, p)
        return frames.reshape(grid_h * grid_w, channels * c.temporal_patch_size * p * p).contiguous()


def image_placeholder(num_tokens: int) -> str:
    """The text one image occupies in a Qwen2-VL prompt."""
    return VISION_START + IMAGE_PAD * num_tokens + VISION_END


def expand_image_tokens(text: str, num_image_tokens: Sequence[int], image_token: str = IMAGE_PAD) -> str:
    """Repeat the i-th `image_token` of a templated prompt `num_image_tokens[i]` times.

    The chat template writes `<|vision_start|><|image_pad|><|vision_end|>` per image; this
    is the expansion HF's Qwen2VLProcessor applies before tokenizing. Placeholders must
    come from the template only: user text has to be tokenized without special-token
    parsing, or a user could type `<|image_pad|>` and shift every image's slot.
    """
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(num_image_tokens):
        raise ValueError(
            f"prompt has {len(pieces) - 1} {image_token} placeholders for {len(num_image_tokens)} images"
        )
    out = [pieces[0]]
    for count, piece in zip(num_image_tokens, pieces[1:], strict=True):
        out.append(image_token * count)
        out.append(piece)
    return "".join(out)
