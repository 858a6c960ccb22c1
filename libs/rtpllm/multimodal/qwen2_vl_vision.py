"""The Qwen2-VL vision tower: a ViT over dynamic-resolution patches plus the patch merger.

Input is the processor's flat patch layout, all images concatenated: (N, C*T*P*P) rows
with `grid_thw` saying which rows belong to which image. The tower

1. embeds each patch with one linear map (the checkpoint's Conv3d has kernel = stride =
   the whole patch, so it *is* a linear map over the flattened patch);
2. runs pre-norm transformer blocks whose attention stays within one image (and one
   frame), with 2-D rotary embeddings: half of each head's rotary angles come from the
   patch row, half from the patch column;
3. merges each 2x2 block of neighbouring patches (adjacent rows, by the processor's
   layout) into one language-model token with a LayerNorm + 2-layer MLP.

Output: (N / merge_size**2, lm_hidden_size), one row per placeholder token, images in
input order.
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

# Where Qwen2-VL checkpoints keep the tower: Qwen's releases (and transformers'
# save_pretrained) use `visual.`, transformers' in-memory layout `model.visual.`.
CHECKPOINT_PREFIXES = ("visual.", "model.visual.", "")


@dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """Shape of the vision tower; `out_hidden_size` is the language model's hidden size."""

    depth: int = 32
    embed_dim: int = 1280
    out_hidden_size: int = 3584
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> Qwen2VLVisionConfig:
        """From a Qwen2-VL `config.json` dict (or its `vision_config`)."""
        vision = config.get("vision_config", config)
        rope = vision.get("rope_parameters") or {}
        return cls(
            depth=int(vision.get("depth", cls.depth)),
            embed_dim=int(vision.get("embed_dim", cls.embed_dim)),
            # The vision config's `hidden_size` is the merger's output: the LM width.
            out_hidden_size=int(vision.get("hidden_size", cls.out_hidden_size)),
            num_heads=int(vision.get("num_heads", cls.num_heads)),
            mlp_ratio=float(vision.get("mlp_ratio", cls.mlp_ratio)),
            # Qwen's released configs say `in_chans`, transformers' say `in_channels`.
            in_channels=int(vision.get("in_channels", vision.get("in_chans", cls.in_channels))),
            patch_size=int(vision.get("patch_size", vision.get("spatial_patch_size", cls.patch_size))),
            temporal_patch_size=int(vision.get("temporal_patch_size", cls.temporal_patch_size)),
            spatial_merge_size=int(vision.get("spatial_merge_size", cls.spatial_merge_size)),
            hidden_act=str(vision.get("hidden_act", cls.hidden_act)),
            rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", cls.rope_theta))),
        )


class VisionAttention(nn.Module):
    """Multi-head attention with 2-D rotary embeddings, block-diagonal over images."""

    def __init__(self, config: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_lens: list[int]
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each (N, heads, dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return self.proj(_block_diagonal_attention(q, k, v, seq_lens).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig) -> None:
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden)
        self.act = activation(config.hidden_act)
        self.fc2 = nn.Linear(hidden, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block (LayerNorm, eps 1e-6)."""

    def __init__(self, config: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = VisionMLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_lens: list[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seq_lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, then concatenate each merge block's patches and project to the LM width."""

    def __init__(self, config: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.merged_dim = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),
            nn.Linear(self.merged_dim, config.out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_dim))


class PatchEmbed(nn.Module):
    """The Conv3d patch embedding as the linear map it is; weight kept flat (embed, C*T*P*P)."""

    def __init__(self, config: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.patch_dim, config.embed_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.to(self.proj.weight.dtype))


class Qwen2VLVisionTower(nn.Module):
    """Qwen2-VL's vision encoder and merger: pixel patches -> LM-width image embeddings."""

    def __init__(self, config: Qwen2VLVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> Qwen2VLVisionTower:
        """Build from an HF Qwen2-VL directory (config.json + safetensors)."""
        config = Qwen2VLVisionConfig.from_hf(json.loads((Path(model_dir) / "config.json").read_text()))
        return build_tower(lambda: cls(config), model_dir, CHECKPOINT_PREFIXES, dtype, device)

    def checkpoint_targets(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor names (relative to the tower's prefix) -> where they go."""
        c = self.config
        targets = {name: p.detach() for name, p in self.named_parameters()}
        # The checkpoint stores the patch embedding as a Conv3d kernel.
        targets["patch_embed.proj.weight"] = self.patch_embed.proj.weight.detach().view(
            c.embed_dim, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size
        )
        return targets

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(N, C*T*P*P) patches of all images -> (N / merge**2, out_hidden_size)."""
        grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        if sum(t * h * w for t, h, w in grids) != pixel_values.shape[0]:
            raise ValueError(f"grid_thw {grids} does not cover the {pixel_values.shape[0]} patch rows")
        x = self.patch_embed(pixel_values)
        cos, sin = self._rotary(grids, x.device)
        # Attention segments: each frame of each image on its own.
        seq_lens = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, seq_lens)
        return self.merger(x)

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """`forward`, split into one (tokens, hidden) tensor per image."""
        merged = self.forward(pixel_values, grid_thw)
        per_image = (grid_thw.prod(-1) // self.config.spatial_merge_size**2).tolist()
        return list(merged.split(per_image))

    def _rotary(
        self, grids: list[tuple[int, ...]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (N, head_dim) for every patch row, from its (row, column) in its image."""
        c = self.config
        m = c.spatial_merge_size
        positions = []
        for t, h, w in grids:
            rows = torch.arange(h, device=device).view(h, 1).expand(h, w)
            cols = torch.arange(w, device=device).view(1, w).expand(h, w)
            # The same block-major order as the processor's patch rows.
            pos = (
                torch.stack([rows, cols], dim=-1)
                .reshape(h // m, m, w // m, m, 2)
                .transpose(1, 2)
                .reshape(-1, 2)
            )
            positions.append(pos.repeat(t, 1))
        pos = torch.cat(positions).float()
        spatial = c.head_dim // 2  # each axis gets half of the rotated pairs
        inv_freq = 1.0 / (
            c.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=device) / spatial)
        )
        # Angles: rows then columns, each over head_dim/4 frequencies; the pair is then
        # repeated so rotate-half pairs dimension i with i + head_dim/2.
        angles = (pos[:, :, None] * inv_freq).reshape(pos.shape[0], -1)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def _block_diagonal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """Attention within each segment of `seq_lens` rows ((N, heads, dim) in and out):
    tokens never attend across images, and nothing of size N x N over the whole batch is
    materialized. Segments of equal length (images of one size: the common case in a
    batch) share one batched call, so a batch of images costs a few kernel launches per
    layer, not one per image."""
    out = torch.empty_like(q)
    starts = [0]
    for length in seq_lens:
        starts.append(starts[-1] + length)
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(seq_lens):
        by_length.setdefault(length, []).append(i)
    heads, dim = q.shape[1], q.shape[2]
    for length, members in by_length.items():
        first = starts[members[0]]
        if len(members) == 1 or all(starts[j] == first + length * r for r, j in enumerate(members)):
            rows: slice | torch.Tensor = slice(first, first + length * len(members))  # contiguous
        else:
            rows = torch.cat([torch.arange(starts[j], starts[j] + length, device=q.device) for j in members])

        def batched(x: torch.Tensor, rows: slice | torch.Tensor = rows, count: int = len(members), length: int = length) -> torch.Tensor:
            return x[rows].view(count, length, heads, dim).transpose(1, 2)  # (B, heads, L, dim)

        att = F.scaled_dot_product_attention(batched(q), batched(k), batched(v))
        out[rows] = att.transpose(1, 2).reshape(-1, heads, dim)
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in float32 (x: (N, heads, dim); cos/sin: (N, dim))."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)
