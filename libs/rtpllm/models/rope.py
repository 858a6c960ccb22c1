"""Rotary position embedding: inverse-frequency schedules for each scaling variant and
the cos/sin tables; the rotation itself is `rtpllm.kernels.rope.apply_rope`."""

from __future__ import annotations

import math

import torch
from torch import nn

from rtpllm.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, rot_dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [rot_dim/2] float32, attention scaling) for a rope config."""
    base = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
    inv_freq = 1.0 / (rope.theta**base)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if rope.rope_type == "yarn":
        return _yarn(rope, rot_dim, max_position)
    raise ValueError(f"unsupported rope_type {rope.rope_type!r}")


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between
    # blended linearly in 1/wavelength (Llama 3.1's published schedule).
    old_len = rope.original_max_position_embeddings or 8192
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(rope: RopeConfig, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    orig = rope.original_max_position_embeddings or max_position
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    else:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (non-interleaved halves),
    shared by every layer and read by `rtpllm.kernels.rope.apply_rope`."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_position: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.max_position = max_position
        self.table_dtype = dtype
        # Kept as buffers (not parameters) so .to(device) moves them and the loader skips them.
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        # M-RoPE: the axis (0 temporal, 1 height, 2 width) each rotary dim reads its
        # position from; empty without M-RoPE.
        self.register_buffer("mrope_axis", torch.empty(0, dtype=torch.int64), persistent=False)
        section = rope.mrope_section
        if section is not None and (len(section) != 3 or 2 * sum(section) != head_dim):
            raise ValueError(f"mrope_section {section} must be 3 sizes summing to head_dim / 2 = {head_dim // 2}")

    def build_tables(self, device: torch.device) -> None:
        """Compute the cos/sin tables on `device` (called once the model leaves "meta")."""
        inv_freq, scale = inverse_frequencies(self.rope, self.head_dim, self.max_position)
        t = torch.arange(self.max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scale).to(device=device, dtype=self.table_dtype)
        self.sin = (emb.sin() * scale).to(device=device, dtype=self.table_dtype)
        if self.rope.mrope_section is not None:
            # Pairs [0, s0) rotate with the temporal position, the next s1 with the
            # height, the last s2 with the width; both halves of a head alike.
            half = torch.repeat_interleave(torch.arange(3), torch.tensor(self.rope.mrope_section))
            self.mrope_axis = torch.cat((half, half)).to(device)

    def mrope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[3, T] (temporal, height, width) positions -> per-token cos/sin rows [T, head_dim].

        Row t, dim d is the table entry at the position of the axis dim d belongs to: HF's
        Qwen2-VL rotary embedding, computed by gathering from the 1-D tables.
        """
        index = positions.index_select(0, self.mrope_axis).t()  # [T, head_dim]
        return self.cos.gather(0, index), self.sin.gather(0, index)
