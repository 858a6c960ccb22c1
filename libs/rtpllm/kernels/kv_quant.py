"""KV-cache number formats: the quantize/dequantize math of one (token, KV head) row.

Two formats, each with one fp32 scale per token per KV head (docs/kv_quantization.md):
- "fp8":  e4m3 values (torch.float8_e4m3fn), scale = amax / 448;
- "int8": symmetric int8 values in [-127, 127], scale = amax / 127.

The same arithmetic runs in three places that must agree bit for bit: the torch
reference here (CPU engine, tests), the Triton helper `quantize_rows` that the store-KV,
decode and extend kernels inline, and the dequantization inside the attention kernels.
So every step is an IEEE-exact fp32 operation in a fixed order: amax, scale = amax *
(1 / QMAX) (a multiply by an fp32 constant, not a division, which Triton lowers to an
approximate instruction), inv = 1 / scale (correctly rounded: `div_rn`), y = x * inv,
then fp8 round-to-nearest-even with saturation, or int8 floor(y + 0.5) clamped. A GPU
may still contract `y + 0.5` into an FMA; that moves an int8 value by one step on exact
ties only, which the kernel tests allow for.
"""

from __future__ import annotations

import torch

from rtpllm.kernels._triton import tl, triton

QUANT_FORMATS = ("fp8", "int8")
# The kernels' QUANT constexpr: 0 plain cache dtype, 1 fp8 e4m3, 2 int8.
QUANT_CODE = {"fp8": 1, "int8": 2}
FP8_MAX = 448.0
INT8_MAX = 127.0
# A row of zeros still gets a finite scale (its values quantize to 0).
MIN_AMAX = 1e-8
SCALE_DTYPE = torch.float32
_STORAGE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def storage_dtype(fmt: str) -> torch.dtype:
    """torch dtype of a quantized format's values."""
    return _STORAGE[fmt]


def format_of(cache: torch.Tensor) -> str | None:
    """The quantized format a cache tensor holds ("fp8", "int8"), or None for a plain one."""
    for fmt, dtype in _STORAGE.items():
        if cache.dtype == dtype:
            return fmt
    return None


def quant_code(cache: torch.Tensor) -> int:
    fmt = format_of(cache)
    return 0 if fmt is None else QUANT_CODE[fmt]


# The attention kernels fold a value's scale into its probability before the PV dot,
# rounded to the query's dtype. p * scale falls into fp16's subnormals at long contexts
# (scale ~ amax / 448), so they fold p * scale * QMAX (~ p * amax) and divide the output
# by QMAX once: 1.6e-4 vs 5.8e-3 relative error at 16k fp16 tokens (bf16: no change).
V_MUL = {0: 1.0, 1: FP8_MAX, 2: INT8_MAX}


def kernel_scales(
    cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, placeholder: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """A kernel launch's (QUANT code, K scales, V scales): a quantized cache must come
    with its scale views [blocks, block_size, kv_heads] fp32 (any strides: the kernels
    take all three); a plain one passes `placeholder`, an unused tensor, so every launch
    has the same argument types."""
    quant = quant_code(cache)
    if not quant:
        return 0, placeholder, placeholder
    assert k_scale is not None and v_scale is not None, "a quantized cache needs its scales"
    for s in (k_scale, v_scale):
        assert s.dim() == 3 and s.dtype == SCALE_DTYPE, "scales are [blocks, block_size, kv_heads] fp32"
    return quant, k_scale, v_scale


def scale_strides(quant: int, k_scale: torch.Tensor, v_scale: torch.Tensor) -> tuple[int, ...]:
    """The six scale strides every quantized-KV launch passes, K's then V's (block,
    token, KV head: `kernel_scales`' views); zeros for a plain cache's placeholders."""
    return (*k_scale.stride(), *v_scale.stride()) if quant else (0,) * 6


def _qmax(fmt: str) -> float:
    return FP8_MAX if fmt == "fp8" else INT8_MAX


def quantize_ref(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (values [..., D] in the format's dtype, scales [...] fp32)."""
    if fmt not in _STORAGE:
        raise ValueError(f"unknown KV quantization format {fmt!r}; use one of {', '.join(QUANT_FORMATS)}")
    x32 = x.float()
    amax = x32.abs().amax(-1).clamp_min(MIN_AMAX)
    inv_qmax = torch.tensor(1.0 / _qmax(fmt), dtype=torch.float32, device=x.device)
    scale = amax * inv_qmax
    y = x32 * (1.0 / scale).unsqueeze(-1)
    if fmt == "fp8":
        values = y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        values = torch.floor(y + 0.5).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values, scale


def dequantize_ref(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """values [..., D], scales [...] -> x [..., D] in `dtype` (computed in fp32)."""
    return (values.float() * scales.float().unsqueeze(-1)).to(dtype)


def roundtrip_ref(x: torch.Tensor, fmt: str | None, dtype: torch.dtype) -> torch.Tensor:
    """What attention sees of a new row: through the cache format and back (a plain cache
    dtype rounds through that dtype)."""
    if fmt is None:
        return x
    return dequantize_ref(*quantize_ref(x, fmt), dtype)


@triton.jit
def quantize_rows(x, QUANT: tl.constexpr):
    """x [R, D] fp32 (padded lanes 0) -> (values [R, D] in the storage type, scale [R] fp32).
    QUANT 1: fp8 e4m3 (values typed float8e4nv); 2: int8."""
    amax = tl.maximum(tl.max(tl.abs(x), 1), 1e-8)
    if QUANT == 1:
        scale = amax * (1.0 / 448.0)
    else:
        scale = amax * (1.0 / 127.0)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    y = x * inv[:, None]
    if QUANT == 1:
        q = tl.minimum(tl.maximum(y, -448.0), 448.0).to(tl.float8e4nv)
    else:
        q = tl.minimum(tl.maximum(tl.floor(y + 0.5), -127.0), 127.0).to(tl.int8)
    return q, scale
