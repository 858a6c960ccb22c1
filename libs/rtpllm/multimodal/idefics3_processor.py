"""Idefics3 image preprocessing and prompt expansion, equal to HF's PIL image processor.

An image is resized (LANCZOS) so its longest edge is `longest_edge` (default 4 * 364,
upscaling small images too), then up to the next multiple of the tile size
(`max_image_size`, default 364) on both sides, and cut into rows x cols tiles; a
downscaled copy of the whole image (the "global" tile) comes last. An image that is a
single tile after rounding is sent alone and gets rows = cols = 0. Tiles are rescaled to
[0, 1] and normalized with mean = std = 0.5. Every tile becomes `image_seq_len`
language-model tokens.

All resizes stay in uint8 PIL images and the float math follows HF's order, so
`pixel_values` match HF bit for bit.
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

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"

# HF caps the first resize at 4K so a huge `longest_edge` cannot blow up memory.
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class Idefics3ImageConfig:
    """Preprocessing parameters (HF `preprocessor_config.json`); defaults are Idefics3's."""

    longest_edge: int = 4 * 364
    max_image_size: int = 364
    do_image_splitting: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STANDARD_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_hf(cls, preprocessor_config: Mapping[str, Any]) -> Idefics3ImageConfig:
        cfg = preprocessor_config
        return cls(
            longest_edge=int((cfg.get("size") or {}).get("longest_edge", cls.longest_edge)),
            max_image_size=int((cfg.get("max_image_size") or {}).get("longest_edge", cls.max_image_size)),
            do_image_splitting=bool(cfg.get("do_image_splitting", cls.do_image_splitting)),
            image_mean=tuple(cfg.get("image_mean", cls.image_mean)),  # type: ignore[arg-type]
            image_std=tuple(cfg.get("image_std", cls.image_std)),  # type: ignore[arg-type]
            rescale_factor=float(cfg.get("rescale_factor", cls.rescale_factor)),
        )


@dataclass(frozen=True)
class Idefics3ImageInputs:
    """Preprocessed images, their tiles concatenated in request order.

    `pixel_values`: (total tiles, C, H, W) float32, zero-padded to the largest tile.
    `pixel_attention_mask`: (total tiles, H, W) bool, True on real pixels.
    `rows`, `cols`: the tile grid of each image (0, 0 when it is a single tile).
    `tiles_per_image`: rows * cols + 1 with splitting, else 1.
    """

    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor
    rows: list[int]
    cols: list[int]
    tiles_per_image: list[int]


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Scale so the longest edge is `longest_edge` (even sides for the other), then cap at 4K."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)

    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def tiled_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Round both sides up to multiples of the tile size, the way HF does it.

    HF rounds the long side first and derives the short one from the rounded long side
    and the aspect ratio before rounding it up; doing it any other way changes the grid.
    """
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


class Idefics3ImageProcessor:
    """Turns RGB images into Idefics3 tiles, pixel masks and the tile grid per image."""

    def __init__(self, config: Idefics3ImageConfig | None = None) -> None:
        self.config = config or Idefics3ImageConfig()
        c = self.config
        self._mean = torch.tensor(c.image_mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(c.image_std, dtype=torch.float32).view(-1, 1, 1)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles for an image of this size, without touching pixels."""
        c = self.config
        if not c.do_image_splitting:
            return 0, 0
        tiled_h, tiled_w = tiled_size(*longest_edge_size(height, width, c.longest_edge), c.max_image_size)
        if tiled_h > c.max_image_size or tiled_w > c.max_image_size:
            return tiled_h // c.max_image_size, tiled_w // c.max_image_size
        return 0, 0

    def num_tiles(self, height: int, width: int) -> int:
        rows, cols = self.grid(height, width)
        return rows * cols + 1

    def preprocess(self, image: Image.Image) -> tuple[list[torch.Tensor], int, int]:
        """One RGB image -> (normalized tiles, global tile last; rows; cols)."""
        c = self.config
        if image.width <= 0 or image.height <= 0:
            raise ImageError(f"image has zero size ({image.width}x{image.height})", "zero_size")
        tile = c.max_image_size
        lanczos = Image.Resampling.LANCZOS
        height, width = longest_edge_size(image.height, image.width, c.longest_edge)
        # Two successive resizes, as HF does; one direct resize would round differently.
        resized = to_rgb(image).resize((width, height), lanczos)
        if not c.do_image_splitting:
            return [self._normalize(resized.resize((tile, tile), lanczos))], 0, 0

        tiled_h, tiled_w = tiled_size(height, width, tile)
        resized = resized.resize((tiled_w, tiled_h), lanczos)
        if tiled_h <= tile and tiled_w <= tile:
            return [self._normalize(resized)], 0, 0
        rows, cols = tiled_h // tile, tiled_w // tile
        whole = self._normalize(resized)
        tiles = [
            whole[:, r * tile : (r + 1) * tile, col * tile : (col + 1) * tile]
            for r in range(rows)
            for col in range(cols)
        ]
        tiles.append(self._normalize(resized.resize((tile, tile), lanczos)))
        return tiles, rows, cols

    def __call__(self, images: Sequence[Image.Image]) -> Idefics3ImageInputs:
        tiles: list[torch.Tensor] = []
        rows: list[int] = []
        cols: list[int] = []
        counts: list[int] = []
        for image in images:
            image_tiles, r, col = self.preprocess(image)
            tiles.extend(image_tiles)
            rows.append(r)
            cols.append(col)
            counts.append(len(image_tiles))
        pixel_values, mask = pad_tiles(tiles)
        return Idefics3ImageInputs(pixel_values, mask, rows, cols, counts)

    def _normalize(self, image: Image.Image) -> torch.Tensor:
        c = self.config
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        # HF's order of operations (float64 rescale, cast, float32 normalize): equal bits.
        scaled = (pixels.to(torch.float64) * c.rescale_factor).to(torch.float32)
        return (scaled - self._mean) / self._std


def pad_tiles(tiles: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (C, h, w) tiles into (N, C, H, W) zero-padded at the bottom/right, and the
    (N, H, W) mask of real pixels."""
    if not tiles:
        return torch.empty(0, 3, 0, 0), torch.empty(0, 0, 0, dtype=torch.bool)
    height = max(t.shape[1] for t in tiles)
    width = max(t.shape[2] for t in tiles)
    values = torch.zeros(len(tiles), tiles[0].shape[0], height, width, dtype=torch.float32)
    mask = torch.zeros(len(tiles), height, width, dtype=torch.bool)
    for i, t in enumerate(tiles):
        values[i, :, : t.shape[1], : t.shape[2]] = t
        mask[i, : t.shape[1], : t.shape[2]] = True
    return values, mask


def image_seq_len(image_size: int, patch_size: int, scale_factor: int) -> int:
    """Language-model tokens per tile: patches per tile, divided by the pixel shuffle."""
    return (image_size // patch_size) ** 2 // scale_factor**2


def image_prompt(rows: int, cols: int, seq_len: int) -> str:
    """The text one image occupies in an Idefics3 prompt.

    Each tile is `<fake_token_around_image><row_r_col_c>` + `<image>` * seq_len, a
    newline ends each row of tiles, and the global image follows after a blank line,
    tagged `<global-img>` and closed by a last `<fake_token_around_image>`.
    """
    image_run = IMAGE_TOKEN * seq_len
    global_part = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{image_run}{FAKE_IMAGE_TOKEN}"
    if rows == 0 and cols == 0:
        return global_part
    lines = [
        "".join(f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>{image_run}" for c in range(cols)) + "\n"
        for r in range(rows)
    ]
    return "".join(lines) + "\n" + global_part


def num_image_tokens(rows: int, cols: int, seq_len: int) -> int:
    """`<image>` tokens (= embeddings to splice in) for one image."""
    return (rows * cols + 1) * seq_len


def expand_image_tokens(
    text: str, grids: Sequence[tuple[int, int]], seq_len: int, image_token: str = IMAGE_TOKEN
) -> str:
    """Replace the i-th `<image>` of a templated prompt with `image_prompt(*grids[i])`,
    as HF's Idefics3Processor does before tokenizing. As for Qwen2-VL, `<image>` must come
    from the template only, never from user text parsed as special tokens."""
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(grids):
        raise ValueError(f"prompt has {len(pieces) - 1} {image_token} placeholders for {len(grids)} images")
    out = [pieces[0]]
    for (rows, cols), piece in zip(grids, pieces[1:], strict=True):
        out.append(image_prompt(rows, cols, seq_len))
        out.append(piece)
    return "".join(out)
