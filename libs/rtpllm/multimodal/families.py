"""The two vision-language families, each as the glue between its processor, its vision
tower and the language model.

A `VisionFamily` answers what the prompt builder and the engine need to know:

- which token the chat template writes per image, and what it expands to (the token
  ids that replace it, with the preprocessed pixels; or, from the image's size alone,
  just the token ids and grid: what the gateway needs to build and route a prompt);
- how to build the vision tower from the checkpoint and encode a batch of images;
- the language model's positions for a prompt with images (M-RoPE for Qwen2-VL, plain
  positions for Idefics3).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from rtpllm.models.config import ModelConfig
from rtpllm.multimodal import idefics3_processor as idefics3
from rtpllm.multimodal import qwen2_vl_processor as qwen2_vl
from rtpllm.multimodal.idefics3_vision import Idefics3VisionConfig, Idefics3VisionTower
from rtpllm.multimodal.inputs import ImageInput
from rtpllm.multimodal.mrope import mrope_positions
from rtpllm.multimodal.qwen2_vl_vision import Qwen2VLVisionConfig, Qwen2VLVisionTower
from rtpllm.tokenizer import Tokenizer


@dataclass(frozen=True)
class ProcessedImage:
    """One preprocessed image and the prompt tokens that stand for it."""

    token_ids: list[int]  # replace the template's one image token
    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor | None = None
    grid_thw: tuple[int, int, int] | None = None


class VisionFamily(ABC):
    """One vision-language family: its image token, preprocessing, tower and positions."""

    name: str
    image_token: str  # what the chat template writes for each image
    image_token_id: int  # the placeholder token whose embeddings the image replaces

    @abstractmethod
    def process(self, image: Image.Image, tokenizer: Tokenizer) -> ProcessedImage:
        """Preprocess an RGB image and expand its placeholder."""

    @abstractmethod
    def placeholder(
        self, width: int, height: int, tokenizer: Tokenizer
    ) -> tuple[list[int], tuple[int, int, int] | None]:
        """What `process` would give an RGB image of this size for its token ids and grid,
        without touching pixels: the gateway expands prompts and computes block keys
        with it, and leaves the preprocessing to whoever encodes."""

    @abstractmethod
    def build_tower(
        self, model_dir: Path, dtype: torch.dtype, device: str, random_seed: int | None = None
    ) -> nn.Module:
        """The vision tower (encoder + projector) with the checkpoint's weights, or random
        ones drawn from `random_seed` (benchmarks of full-size shapes)."""

    @abstractmethod
    def encode(self, tower: nn.Module, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        """Embeddings (num_embeds, hidden) of each image, in one batched tower call."""

    def positions(self, num_tokens: int, images: Sequence[ImageInput]) -> tuple[np.ndarray | None, int]:
        """The prompt's positions when they are not 0..n-1: ([3, n] M-RoPE positions,
        delta added to every later position); (None, 0) for plain positions."""
        return None, 0


class Qwen2VLFamily(VisionFamily):
    """Qwen2-VL: one `<|image_pad|>` run per image, M-RoPE positions."""

    name = "qwen2_vl"
    image_token = qwen2_vl.IMAGE_PAD

    def __init__(self, raw_config: dict[str, Any], preprocessor_config: dict[str, Any]) -> None:
        self.image_token_id = int(raw_config.get("image_token_id", 151655))
        self.vision_config = Qwen2VLVisionConfig.from_hf(raw_config)
        self.processor = qwen2_vl.Qwen2VLImageProcessor(
            qwen2_vl.Qwen2VLImageConfig.from_hf(preprocessor_config)
        )

    def process(self, image: Image.Image, tokenizer: Tokenizer) -> ProcessedImage:
        patches, grid = self.processor.preprocess(image)
        return ProcessedImage(self._pad_run(grid), patches, None, grid)

    def placeholder(
        self, width: int, height: int, tokenizer: Tokenizer
    ) -> tuple[list[int], tuple[int, int, int] | None]:
        grid = self.processor.grid_thw(height, width)
        return self._pad_run(grid), grid

    def _pad_run(self, grid: tuple[int, int, int]) -> list[int]:
        t, h, w = grid
        return [self.image_token_id] * (t * h * w // self.processor.config.merge_size**2)

    def build_tower(
        self, model_dir: Path, dtype: torch.dtype, device: str, random_seed: int | None = None
    ) -> nn.Module:
        if random_seed is None:
            return Qwen2VLVisionTower.from_pretrained(model_dir, dtype=dtype, device=device)
        return _random_tower(dtype, device, random_seed, lambda: Qwen2VLVisionTower(self.vision_config))

    def encode(self, tower: nn.Module, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        device = next(tower.parameters()).device
        pixels = torch.cat([_payload(image) for image in images]).to(device)
        grids = torch.tensor([image.grid_thw for image in images], dtype=torch.int64, device=device)
        return tower.encode(pixels, grids)  # type: ignore[operator]

    def positions(self, num_tokens: int, images: Sequence[ImageInput]) -> tuple[np.ndarray | None, int]:
        return mrope_positions(num_tokens, images, self.vision_config.spatial_merge_size)


class Idefics3Family(VisionFamily):
    """Idefics3 / SmolVLM: tiles of `<image>` runs between tile markers, plain positions."""

    name = "idefics3"
    image_token = idefics3.IMAGE_TOKEN

    def __init__(self, raw_config: dict[str, Any], preprocessor_config: dict[str, Any]) -> None:
        self.image_token_id = int(raw_config.get("image_token_id", 128257))
        self.vision_config = Idefics3VisionConfig.from_hf(raw_config)
        self.processor = idefics3.Idefics3ImageProcessor(
            idefics3.Idefics3ImageConfig.from_hf(preprocessor_config)
        )
        # From the model, not the processor config: the connector fixes it.
        self.seq_len = self.vision_config.image_seq_len

    def process(self, image: Image.Image, tokenizer: Tokenizer) -> ProcessedImage:
        tiles, rows, cols = self.processor.preprocess(image)
        pixels, mask = idefics3.pad_tiles(tiles)
        return ProcessedImage(self._tile_prompt(rows, cols, tokenizer), pixels, mask, None)

    def placeholder(
        self, width: int, height: int, tokenizer: Tokenizer
    ) -> tuple[list[int], tuple[int, int, int] | None]:
        rows, cols = self.processor.grid(height, width)
        return self._tile_prompt(rows, cols, tokenizer), None

    def _tile_prompt(self, rows: int, cols: int, tokenizer: Tokenizer) -> list[int]:
        # Tile markers and row breaks come from our own string: parsing its special
        # tokens is what HF's processor does after expanding the text.
        token_ids = tokenizer.encode(
            idefics3.image_prompt(rows, cols, self.seq_len), add_special_tokens=False
        )
        expected = (rows * cols + 1) * self.seq_len  # the tiles and the global image
        if sum(1 for t in token_ids if t == self.image_token_id) != expected:
            raise ValueError(
                f"the tokenizer does not map {self.image_token!r} to the config's image_token_id {self.image_token_id}"
            )
        return token_ids

    def build_tower(
        self, model_dir: Path, dtype: torch.dtype, device: str, random_seed: int | None = None
    ) -> nn.Module:
        if random_seed is None:
            return Idefics3VisionTower.from_pretrained(model_dir, dtype=dtype, device=device)
        return _random_tower(dtype, device, random_seed, lambda: Idefics3VisionTower(self.vision_config))

    def encode(self, tower: nn.Module, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        device = next(tower.parameters()).device
        tiles = [_payload(image) for image in images]
        masks = [image.pixel_attention_mask for image in images]
        height = max(t.shape[2] for t in tiles)
        width = max(t.shape[3] for t in tiles)
        counts = [t.shape[0] for t in tiles]
        # Tiles are the processor's tile size except in odd configs; pad any smaller ones
        # (the mask hides the padding from the encoder, as within one image).
        pixels = torch.zeros(sum(counts), tiles[0].shape[1], height, width, dtype=tiles[0].dtype)
        mask = torch.zeros(sum(counts), height, width, dtype=torch.bool)
        row = 0
        for t, m in zip(tiles, masks, strict=True):
            pixels[row : row + t.shape[0], :, : t.shape[2], : t.shape[3]] = t
            mask[row : row + t.shape[0], : t.shape[2], : t.shape[3]] = True if m is None else m
            row += t.shape[0]
        return tower.encode(pixels.to(device), mask.to(device), counts)  # type: ignore[operator]


def load_vision_family(model_dir: str | Path, config: ModelConfig) -> VisionFamily | None:
    """The family of a vision-language checkpoint; None for a text-only model."""
    if config.vision is None:
        return None
    root = Path(model_dir)
    raw = json.loads((root / "config.json").read_text())
    pre_path = root / "preprocessor_config.json"
    preprocessor = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    if config.vision == Qwen2VLFamily.name:
        return Qwen2VLFamily(raw, preprocessor)
    if config.vision == Idefics3Family.name:
        return Idefics3Family(raw, preprocessor)
    raise ValueError(f"unknown vision family {config.vision!r}")


def _payload(image: ImageInput) -> torch.Tensor:
    if image.pixel_values is None:
        raise ValueError(f"image {image.content_hash[:12]} has no pixels to encode")
    return image.pixel_values


def _random_tower(dtype: torch.dtype, device: str, seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """A tower with random weights drawn on the device (norms 1, the rest N(0, 0.02))."""
    with torch.device("meta"):
        tower = make().to(dtype)
    tower = tower.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return tower.eval().requires_grad_(False)
