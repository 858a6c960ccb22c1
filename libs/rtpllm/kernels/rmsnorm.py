"""RMSNorm, alone or fused with the residual add that precedes it.

One program per row reads x (and the residual) once and writes the normed row (and the
updated residual) once: the eager version makes ~6 passes over the row (add, float cast,
square, mean, scale, cast, weight). The kernel reproduces the reference's rounding steps
(sum in the model dtype, normalise in fp32, cast, multiply by the weight in the model
dtype) so it differs from it only by the order of the fp32 sum of squares.
"""

from __future__ import annotations

import torch

from rtpllm.kernels._triton import next_power_of_2, tl, triton, use_triton


@triton.jit
def _rms_norm_kernel(
    X,
    Residual,
    W,
    Out,
    Res_out,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(Res_out + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    y = (xf * rstd).to(dtype).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (w * y).to(Out.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    res2 = residual.reshape(-1, n) if residual is not None else None
    res_out = torch.empty_like(x2) if residual is not None else None
    rows = x2.shape[0]
    if rows:
        block = next_power_of_2(n)
        _rms_norm_kernel[(rows,)](
            x2,
            res2 if res2 is not None else x2,
            weight,
            out,
            res_out if res_out is not None else out,
            eps,
            x2.stride(0),
            res2.stride(0) if res2 is not None else 0,
            out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            N=n,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            num_warps=min(max(block // 512, 1), 16),
        )
    shape = x.shape
    return out.view(shape), (res_out.view(shape) if res_out is not None else None)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton version of `rms_norm_ref`."""
    assert x.stride(-1) == 1
    return _launch(x, None, weight, eps)[0]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) over the last dim, normalised in fp32 and cast back first."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA, the torch reference elsewhere."""
    if use_triton(x) and x.stride(-1) == 1:
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `fused_add_rms_norm_ref`."""
    assert x.stride(-1) == 1 and residual.stride(-1) == 1
    out, res = _launch(x, residual, weight, eps)
    assert res is not None
    return out, res


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the pre-norm block's residual step."""
    summed = residual + x
    return rms_norm_ref(summed, weight, eps), summed


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher: the Triton kernel on CUDA, the torch reference elsewhere."""
    if use_triton(x) and x.stride(-1) == 1 and residual.stride(-1) == 1:
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)
