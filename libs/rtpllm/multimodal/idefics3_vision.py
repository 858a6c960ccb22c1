"""The Idefics3 (and SmolVLM) vision tower: a SigLIP encoder plus the Idefics3 connector.

Input is a batch of image tiles (N, C, H, W) with a pixel mask saying which pixels are
real (tiles smaller than the batch's largest are zero-padded at the bottom/right). The
tower

1. embeds non-overlapping patches with a strided Conv2d and adds learned position
   embeddings; a tile with fewer patches than the trained grid samples that grid at
   evenly spread positions (NaViT-style), so a partial tile still sees positions from
   the whole range;
2. runs pre-norm transformer layers in which padding patches are masked out as keys;
3. applies a final LayerNorm, then the connector: a pixel shuffle that folds each
   `scale_factor` x `scale_factor` block of patches into one token (fewer tokens, wider
   features) and a bias-free linear projection to the language model's width.

Output: (N, patches / scale_factor**2, lm_hidden_size), one row per `<image>` token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rtpllm.multimodal.activations import activation
from rtpllm.multimodal.weights import build_tower

# Idefics3ForConditionalGeneration saves `model.vision_model.*` and `model.connector.*`;
# an Idefics3Model saved on its own drops the `model.`.
CHECKPOINT_PREFIXES = ("model.", "")


@dataclass(frozen=True)
class Idefics3VisionConfig:
    """Shape of the SigLIP encoder and connector; `text_hidden_size` is the LM width."""

    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    scale_factor: int = 2
    text_hidden_size: int = 4096

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_seq_len(self) -> int:
        """LM tokens per full tile."""
        return self.patches_per_side**2 // self.scale_factor**2

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> Idefics3VisionConfig:
        """From an Idefics3 / SmolVLM `config.json` dict."""
        vision = config.get("vision_config") or {}
        text = config.get("text_config") or {}
        return cls(
            hidden_size=int(vision.get("hidden_size", cls.hidden_size)),
            intermediate_size=int(vision.get("intermediate_size", cls.intermediate_size)),
            num_layers=int(vision.get("num_hidden_layers", cls.num_layers)),
            num_heads=int(vision.get("num_attention_heads", cls.num_heads)),
            num_channels=int(vision.get("num_channels", cls.num_channels)),
            image_size=int(vision.get("image_size", cls.image_size)),
            patch_size=int(vision.get("patch_size", cls.patch_size)),
            hidden_act=str(vision.get("hidden_act", cls.hidden_act)),
            layer_norm_eps=float(vision.get("layer_norm_eps", cls.layer_norm_eps)),
            scale_factor=int(config.get("scale_factor", cls.scale_factor)),
            text_hidden_size=int(text.get("hidden_size", cls.text_hidden_size)),
        )


class VisionEmbeddings(nn.Module):
    """Patch embedding (Conv2d, kernel = stride = patch) plus learned positions."""

    def __init__(self, config: Idefics3VisionConfig) -> None:
        super().__init__()
        self.patches_per_side = config.patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.patches_per_side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return patches.flatten(2).transpose(1, 2) + self.position_embedding(self.position_ids(patch_mask))

    def position_ids(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """(N, rows, cols) bool -> (N, rows * cols) position ids into the trained grid.

        A tile with r valid patch rows places row i at fraction i / r of the trained grid
        and takes the bucket it lands in (columns alike). The float32 arithmetic is the
        one the model was trained with; bucket edges are sensitive to its rounding.
        """
        n = self.patches_per_side
        device = patch_mask.device
        edges = torch.arange(1 / n, 1.0, 1 / n, device=device)

        def buckets(valid: torch.Tensor, length: int) -> torch.Tensor:
            step = 1.0 / valid.clamp(min=1)  # a fully padded tile: any finite ids will do
            fractions = torch.arange(length, device=device, dtype=torch.float32)[None, :] * step[:, None]
            return torch.bucketize(fractions.clamp(max=1.0 - 1e-6), edges, right=True)

        rows = buckets(patch_mask[:, :, 0].sum(dim=1), patch_mask.shape[1])
        cols = buckets(patch_mask[:, 0, :].sum(dim=1), patch_mask.shape[2])
        ids = rows[:, :, None] * n + cols[:, None, :]
        return torch.where(patch_mask, ids, 0).flatten(1)


class SiglipAttention(nn.Module):
    def __init__(self, config: Idefics3VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), attn_mask=key_mask
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class SiglipMLP(nn.Module):
    def __init__(self, config: Idefics3VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: Idefics3VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    """Holds the layers under HF's names (`encoder.layers.N`); SiglipVisionModel runs them."""

    def __init__(self, config: Idefics3VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_layers))


class SiglipVisionModel(nn.Module):
    """Embeddings, encoder layers and the final LayerNorm (HF's Idefics3VisionTransformer)."""

    def __init__(self, config: Idefics3VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.embeddings = VisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        n, _, height, width = pixel_values.shape
        rows, cols = height // self.patch_size, width // self.patch_size
        if pixel_mask is None:
            patch_mask = torch.ones(n, rows, cols, dtype=torch.bool, device=pixel_values.device)
        else:
            # A patch is real if any of its pixels is.
            p = self.patch_size
            patch_mask = (
                pixel_mask[:, : rows * p, : cols * p].reshape(n, rows, p, cols, p).any(dim=4).any(dim=2)
            )
        x = self.embeddings(pixel_values, patch_mask)
        # Padding patches are hidden as keys; with no padding, no mask (faster kernels).
        key_mask = None if bool(patch_mask.all()) else patch_mask.view(n, 1, 1, rows * cols)
        for layer in self.encoder.layers:
            x = layer(x, key_mask)
        return self.post_layernorm(x)


class ModalityProjection(nn.Module):
    def __init__(self, config: Idefics3VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(
            config.hidden_size * config.scale_factor**2, config.text_hidden_size, bias=False
        )


class Connector(nn.Module):
    """Pixel shuffle then a linear projection into the language model's embedding space."""

    def __init__(self, config: Idefics3VisionConfig) -> None:
        super().__init__()
        self.scale_factor = config.scale_factor
        self.modality_projection = ModalityProjection(config)

    def forward(self, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        n, _, d = x.shape
        s = self.scale_factor
        # Token (i, j) of the output gathers patches (i*s + di, j*s + dj), features
        # ordered (di, dj, d): the layout the projection was trained on.
        shuffled = (
            x.view(n, rows // s, s, cols // s, s, d).permute(0, 1, 3, 2, 4, 5).reshape(n, -1, s * s * d)
        )
        return self.modality_projection.proj(shuffled)


class Idefics3VisionTower(nn.Module):
    """Idefics3's SigLIP encoder and connector: image tiles -> LM-width embeddings."""

    def __init__(self, config: Idefics3VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionModel(config)
        self.connector = Connector(config)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> Idefics3VisionTower:
        """Build from an HF Idefics3 / SmolVLM directory (config.json + safetensors)."""
        config = Idefics3VisionConfig.from_hf(json.loads((Path(model_dir) / "config.json").read_text()))
        return build_tower(lambda: cls(config), model_dir, CHECKPOINT_PREFIXES, dtype, device)

    def checkpoint_targets(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor names (relative to the prefix) -> parameters; ours mirror HF's."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def forward(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, C, H, W) tiles (+ (N, H, W) pixel mask) -> (N, tokens per tile, text_hidden_size)."""
        p, s = self.config.patch_size, self.config.scale_factor
        rows, cols = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        if rows % s or cols % s:
            raise ValueError(f"a {rows}x{cols}-patch tile cannot be pixel-shuffled by {s}")
        hidden = self.vision_model(pixel_values, pixel_attention_mask)
        return self.connector(hidden, rows, cols)

    def encode(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None,
        tiles_per_image: list[int],
    ) -> list[torch.Tensor]:
        """`forward`, flattened into one (tiles * tokens per tile, hidden) tensor per image."""
        out = self.forward(pixel_values, pixel_attention_mask)
        return [t.reshape(-1, t.shape[-1]) for t in out.split(tiles_per_image)]
