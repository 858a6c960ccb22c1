"""Building blocks of the decoder: RMSNorm, gated MLP, paged attention layer.

The elementwise work goes through the fused-op dispatchers in `rtpllm.kernels`: Triton
kernels on CUDA, torch references (the exact eager computation) elsewhere. The linear
layers go through `kernels.gemv.linear`: a Triton GEMV for decode-sized batches on CUDA,
`F.linear` otherwise.

Tensor parallelism: each layer takes the rank's `ShardLayout` (its heads, KV heads and
MLP columns) and group; o_proj and down_proj are `RowParallelLinear`, which sum their
output over the ranks. With neither, a layer is the whole model's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from rtpllm.attention import AttentionBackend, AttentionMetadata
from rtpllm.kernels.activation import silu_and_mul
from rtpllm.kernels.gemv import linear
from rtpllm.kernels.rmsnorm import fused_add_rms_norm, rms_norm
from rtpllm.kernels.rope import apply_rope
from rtpllm.models.config import ModelConfig
from rtpllm.models.parallel_layers import RowParallelLinear
from rtpllm.parallel.layout import ShardLayout

if TYPE_CHECKING:
    from rtpllm.parallel.group import TPGroup


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) whose forward goes through the
    small-batch GEMV dispatcher; on the CPU that is exactly `F.linear`. Not initialized:
    see `Embedding`."""

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding, not initialized. Weights always come from a checkpoint or
    `fill_random`, and the model is built on the meta device, where torch's initializers
    run as reference decompositions that import torch._dynamo (and sympy): about 1 s of
    every engine start, 5-7 s on the GPU machine (docs/benchmarks.md)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as the HF reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) in one pass: the pre-norm residual step."""
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul.
    `intermediate`: the columns this rank holds (all of them without a group)."""

    def __init__(self, hidden: int, intermediate: int, group: TPGroup | None = None) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = RowParallelLinear(intermediate, hidden, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class Attention(nn.Module):
    """Self-attention with fused qkv, optional q/k RMSNorm (Qwen3) and a paged KV cache."""

    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        layout: ShardLayout | None = None,
        group: TPGroup | None = None,
    ) -> None:
        super().__init__()
        layout = layout or ShardLayout.of(config)
        self.num_heads = layout.num_heads
        self.num_kv_heads = layout.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = layout.q_size
        self.kv_size = layout.kv_size
        self.scale = config.head_dim**-0.5
        self.sliding_window = config.sliding_window
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, group)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.backend = backend
        # [Hkv, D] subtracted from the rotated keys: K centering (rtpllm.models.k_centering).
        self.k_shift: torch.Tensor | None = None

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, ...],
        meta: AttentionMetadata,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """`cos`/`sin`: the rotary tables `positions` index (the model's shared tables,
        or per-token rows for M-RoPE)."""
        q, k, v = self.rotated_qkv(positions, x, cos, sin)
        # A quantized layer's cache is (k, v, k_scale, v_scale) (rtpllm.kvcache.kv_pool).
        out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.sliding_window, *kv_cache[2:])
        return self.o_proj(out.reshape(x.shape[0], self.q_size))

    def rotated_qkv(
        self, positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What attention reads: q [T, H, D] and k, v [T, Hkv, D], with q/k norm, RoPE and
        the K shift applied."""
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        # q/k norm (Qwen3) and RoPE in one pass; on CUDA in place on the qkv output.
        qw = self.q_norm.weight if self.q_norm is not None else None
        kw = self.k_norm.weight if self.k_norm is not None else None
        eps = self.q_norm.eps if self.q_norm is not None else 0.0
        q, k = apply_rope(positions, q, k, cos, sin, qw, kw, eps, self.k_shift)
        return q, k, v


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        layout: ShardLayout | None = None,
        group: TPGroup | None = None,
    ) -> None:
        super().__init__()
        layout = layout or ShardLayout.of(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend, layout, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, layout.intermediate, group)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, ...],
        meta: AttentionMetadata,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pre-norm layer with the residual carried separately: returns (mlp output,
        residual) whose sum is the layer's output, so the caller fuses that add into the
        next layer's input norm (and the final norm) with `RMSNorm.add_and_norm`.
        `residual` is None for the first layer (hidden is then the embeddings)."""
        if residual is None:
            residual = hidden
            normed = self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm.add_and_norm(hidden, residual)
        attn = self.self_attn(positions, normed, kv_cache, meta, cos, sin)
        normed, residual = self.post_attention_layernorm.add_and_norm(attn, residual)
        return self.mlp(normed), residual
