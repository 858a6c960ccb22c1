"""SiLU-and-mul on the fused gate_up projection: out = silu(gate) * up.

One pass over the [T, 2I] input and one write of the [T, I] output, where eager torch
materialises the two halves' silu and product separately. The reference's rounding (silu
rounded to the model dtype, then the product) is reproduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rtpllm.kernels._triton import cdiv, tl, triton, use_triton

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    u = tl.load(X + row * stride_x + N + offs, mask=mask, other=0.0)
    dtype = g.dtype
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(dtype).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (s * u.to(tl.float32)).to(dtype), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `silu_and_mul_ref`."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    assert x2.stride(-1) == 1
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], cdiv(n, _BLOCK))](
            x2, out, x2.stride(0), out.stride(0), N=n, BLOCK=_BLOCK, num_warps=4
        )
    return out.view(*x.shape[:-1], n)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate | up) -> [..., I] silu(gate) * up."""
    gate, up = x.split(x.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA, the torch reference elsewhere."""
    if use_triton(x) and x.stride(-1) == 1:
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
