"""Per-channel K smoothing: an exact rescaling of q and k that flattens K's channels.

Why: some models' keys carry a few channels far larger than the rest (Qwen2.5's first
layers, through the k_proj bias). One 8-bit scale per (token, KV head) row is set by the
largest channel, so the small ones keep only a few int8 levels: int8 KV changes layer 0
of Qwen2.5-Coder-1.5B's attention output by 23%, every other layer's by 1-4%
(docs/kv_quantization.md).

How, with no kernel change: attention only sees q . k, and for any s > 0 per channel,
q . k = (q * s) . (k / s). Keys stored as k / s have flat channels and fine int8 steps;
queries taken as q * s give the same scores. RoPE rotates channel i with channel i + D/2,
and a plane rotation commutes with scaling both coordinates by one factor, so a vector
with s[i] == s[i + D/2] can be applied *before* RoPE: folded into the q and k rows of
the qkv projection (weights and bias) when the model loads, at no cost per step. Models
with q/k RMSNorm (Qwen3) normalize each head before RoPE, so there the vector goes into
the norm weights instead, which every head shares: one vector per layer.

The vectors come from calibration (rtpllm.engine.kv_calibrate): per layer, KV head and
rotation pair, `a` = the largest |k| seen on either channel of the pair; s = a^alpha,
scaled to a geometric mean of 1 (alpha 0: no smoothing). The calibration measures each
layer's int8 error under a few alphas and keeps the best; the plan file carries the
vectors (rtpllm.kvcache.kv_plan).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rtpllm.models.decoder import DecoderLM
    from rtpllm.models.layers import Attention

# The alphas the calibration tries per layer (0, no smoothing, is always a candidate).
CALIBRATION_ALPHAS = (0.5, 0.75, 1.0)
_MIN_AMAX = 1e-6


def smoothing_vectors(k_amax: torch.Tensor, alpha: float, shared: bool = False) -> torch.Tensor:
    """[Hkv, D] per-channel max |k| -> [Hkv, D] vectors s, equal on each rotation pair
    (i, i + D/2), geometric mean 1 per row. `shared`: one vector for every head (the
    heads' maxima merged), for models whose q/k norm weights all heads share."""
    amax = k_amax.float().clamp_min(_MIN_AMAX)
    if shared:
        amax = amax.amax(0, keepdim=True).expand_as(k_amax)
    half = amax.shape[-1] // 2
    pair = torch.maximum(amax[:, :half], amax[:, half:])
    s = pair.pow(alpha)
    s = s / s.log().mean(-1, keepdim=True).exp()
    return torch.cat([s, s], -1).contiguous()


def check_vectors(vectors: torch.Tensor, num_kv_heads: int, head_dim: int, where: str) -> None:
    """A clear error for vectors the fold could not apply exactly."""
    if tuple(vectors.shape) != (num_kv_heads, head_dim):
        raise ValueError(f"{where}: K smoothing vectors are {list(vectors.shape)}, the model needs [{num_kv_heads}, {head_dim}]")
    if not bool(torch.isfinite(vectors).all()) or not bool((vectors > 0).all()):
        raise ValueError(f"{where}: K smoothing factors must be finite and positive")
    half = head_dim // 2
    if not torch.equal(vectors[:, :half], vectors[:, half:]):
        raise ValueError(f"{where}: K smoothing must scale channels i and i + {half} alike (RoPE rotates them together)")


@torch.no_grad()
def fold_into_attention(
    attn: Attention, vectors: torch.Tensor, head_start: int, kv_head_start: int, q_per_kv: int, qk_norm: bool
) -> None:
    """Scale one layer's queries by s and keys by 1 / s, in its weights. `vectors`: the
    whole model's [Hkv, D] for this layer; the layer holds query heads from `head_start`
    and KV heads from `kv_head_start` (tensor parallelism), `q_per_kv` query heads
    reading each KV head."""
    vectors = vectors.float()
    s = vectors[kv_head_start : kv_head_start + attn.num_kv_heads]
    if qk_norm:
        # RMSNorm(x) * w: the norm sees the unscaled head; its weight carries s.
        assert attn.q_norm is not None and attn.k_norm is not None
        if not torch.equal(vectors, vectors[:1].expand_as(vectors)):
            raise ValueError("K smoothing for a model with q/k norm needs one vector shared by every head")
        attn.q_norm.weight.mul_(s[0].to(attn.q_norm.weight.dtype))
        attn.k_norm.weight.div_(s[0].to(attn.k_norm.weight.dtype))
        return
    # Each query head takes the vector of the KV head it reads.
    q_heads = torch.arange(head_start, head_start + attn.num_heads, device=vectors.device) // q_per_kv
    q_scale = vectors[q_heads].reshape(-1)  # [q_size]
    k_scale = s.reciprocal().reshape(-1)  # [kv_size]
    rows = torch.cat([q_scale, k_scale, torch.ones(attn.kv_size, device=s.device)])
    weight = attn.qkv_proj.weight
    weight.copy_((weight.float() * rows.to(weight.device).unsqueeze(1)).to(weight.dtype))
    bias = attn.qkv_proj.bias
    if bias is not None:
        bias.copy_((bias.float() * rows.to(bias.device)).to(bias.dtype))


def fold_k_smoothing(model: DecoderLM, vectors: Mapping[int, torch.Tensor]) -> list[int]:
    """Fold each layer's vectors (layer -> [Hkv, D]) into `model`; returns the layers
    folded. Validates every vector against the model first, so a bad plan changes nothing."""
    cfg = model.config
    layout = model.layout
    todo = dict(vectors)
    for i, v in todo.items():
        if not 0 <= i < cfg.num_layers:
            raise ValueError(f"K smoothing for layer {i}: the model has layers 0..{cfg.num_layers - 1}")
        check_vectors(v, cfg.num_kv_heads, cfg.head_dim, f"layer {i}")
    q_per_kv = cfg.num_heads // cfg.num_kv_heads
    for i, v in todo.items():
        attn = model.layers[i].self_attn
        device = attn.qkv_proj.weight.device
        fold_into_attention(attn, v.to(device), layout.head_start, layout.kv_head_start, q_per_kv, cfg.qk_norm)
    return sorted(todo)
