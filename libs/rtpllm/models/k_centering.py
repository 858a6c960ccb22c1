"""K centering: an exact shift of every key by a fixed vector, before it is quantized.

Why: some models' keys sit far from zero on a few channels, the same for every token
(Qwen2.5's first layers, through the k_proj bias: on Qwen2.5-Coder-1.5B layer 0's mean key
has norm ~900 and channels of ~350). A quantized value keeps a fixed fraction of its own
size (fp8: 3 mantissa bits) or of its row's largest (int8), so that constant carries a
large absolute error into every score q . k, though it adds the same q . m to all of a
query's scores and softmax ignores it. fp8 KV took Qwen2.5-Coder-1.5B's perplexity up 8%.

How: softmax(q . (k_j - m)) = softmax(q . k_j - q . m) = softmax(q . k_j) for any m that
is the same for every key j a query sees. So the rotated keys are stored as k - m, with m
per layer and KV head, and attention reads them as they are: no change to the attention
kernels, exact up to rounding. The shift goes after RoPE (a shift before it would rotate
with each key's position and no longer cancel), inside the RoPE kernel's store
(rtpllm.kernels.rope, `k_shift`), so the cache and the fresh keys a prefill attends to
are the same shifted keys. Not for attention with a sink logit or a position bias (none
of the supported families has one).

The vectors come from calibration (rtpllm.engine.kv_calibrate): each layer's mean rotated
key over the calibration prompts, with the layer's K smoothing applied. The plan file
carries them (rtpllm.kvcache.kv_plan), and their digest joins the block-key namespace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from rtpllm.models.k_smoothing import fold_k_smoothing

if TYPE_CHECKING:
    from rtpllm.kvcache.kv_plan import KVCachePlan
    from rtpllm.models.decoder import DecoderLM


def check_centers(vectors: torch.Tensor, num_kv_heads: int, head_dim: int, where: str) -> None:
    """A clear error for shifts the model cannot take."""
    if tuple(vectors.shape) != (num_kv_heads, head_dim):
        raise ValueError(f"{where}: K centering vectors are {list(vectors.shape)}, the model needs [{num_kv_heads}, {head_dim}]")
    if not bool(torch.isfinite(vectors).all()):
        raise ValueError(f"{where}: K centering vectors must be finite")


def set_k_centering(model: DecoderLM, vectors: Mapping[int, torch.Tensor]) -> list[int]:
    """Give each layer in `vectors` (layer -> the whole model's [Hkv, D]) its shift, for
    the KV heads it holds (tensor parallelism); returns the layers set. Validates every
    vector first, so a bad plan changes nothing."""
    cfg = model.config
    for i, v in vectors.items():
        if not 0 <= i < cfg.num_layers:
            raise ValueError(f"K centering for layer {i}: the model has layers 0..{cfg.num_layers - 1}")
        check_centers(v, cfg.num_kv_heads, cfg.head_dim, f"layer {i}")
    start = model.layout.kv_head_start
    dtype = model.rotary.table_dtype  # the keys' dtype
    for i, v in vectors.items():
        attn = model.layers[i].self_attn
        device = attn.qkv_proj.weight.device
        attn.k_shift = v[start : start + attn.num_kv_heads].to(device, dtype).contiguous()
    return sorted(vectors)


def apply_key_transforms(model: DecoderLM, plan: KVCachePlan) -> tuple[list[int], list[int]]:
    """A KV-cache plan's K smoothing (folded into the weights) and K centering (shifts
    the RoPE kernel subtracts), on a loaded model or a tensor-parallel rank's shard of
    it; returns the layers smoothed and the layers centered."""
    smoothed = fold_k_smoothing(model, plan.smoothing_vectors()) if plan.k_smooth else []
    centered = set_k_centering(model, plan.centering_vectors()) if plan.k_center else []
    return smoothed, centered
