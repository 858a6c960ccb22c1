"""Guarded Triton import shared by the kernel modules.

Kernel modules must import on machines without Triton (CPU-only installs): there their
torch references and dispatchers still work, and only launching a Triton kernel fails.
`triton` / `tl` are the real modules when Triton imports, else stand-ins that accept the
decorators and annotations the kernel definitions use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    HAS_TRITON = False

    class _MissingLanguage:
        """Stands in for `triton.language`: annotations touch it at import time (strings,
        under postponed evaluation), and module constants made with `tl.constexpr(v)`."""

        @staticmethod
        def constexpr(value: Any) -> Any:
            return value

    class _MissingTriton:
        """Stands in for `triton`: `@triton.jit` yields a kernel that refuses to launch."""

        @staticmethod
        def jit(fn: Callable[..., Any] | None = None, **_: Any) -> Any:
            if fn is None:
                return _MissingTriton.jit
            return _Unlaunchable(fn.__name__)

    class _Unlaunchable:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid: Any) -> Callable[..., Any]:
            raise RuntimeError(f"Triton is not installed: cannot launch kernel {self.name}")

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = _MissingLanguage()  # type: ignore[assignment]


def _patch_interpreter() -> None:
    """Work around two gaps of Triton 3.6's CPU interpreter (TRITON_INTERPRET=1), which the
    kernel tests and `--smoke` benchmarks run under:

    - a scalar used as a `range` bound becomes an int through `int(ndarray)`, but its
      scalars are 1-element arrays, which numpy >= 2.4 refuses to convert;
    - `tl.dot` multiplies bf16 operands as their raw uint16 bit patterns;
    - fp32 -> bf16 casts truncate, where the GPU rounds to nearest even (fp32 -> fp8 e4m3
      casts, used by the quantized KV cache, likewise), and int -> bf16 casts keep the
      integer as raw bits.
    """
    import numpy as np
    from triton.runtime import interpreter

    original_patch = interpreter._patch_lang_tensor

    def patch_tensor(tensor: Any, scope: Any) -> None:
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_tensor

    original_dot = interpreter.InterpreterBuilder.create_dot

    def as_f32(h: Any) -> Any:
        if h.dtype == tl.bfloat16:
            bits = h.data.astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return h

    def create_dot(self: Any, a: Any, b: Any, d: Any, *args: Any) -> Any:
        return original_dot(self, as_f32(a), as_f32(b), d, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot

    original_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar.is_int() and dst_type.scalar == tl.bfloat16:
            # int8 KV values widened for a bf16 dot: numpy would write the integers as
            # raw bf16 bit patterns; go through fp32 (exact for int8).
            src = original_cast(self, src, tl.float32)
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.uint16).numpy(), tl.bfloat16)
        return original_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl

    original_fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self: Any, src: Any, dst_type: Any, rounding_mode: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            # The KV-cache fp8 quantizer (kv_quant.py) clamps first, so torch's RNE cast
            # equals the GPU's cvt.rn.satfinite; the interpreter's own rounding does not.
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.float8_e4m3fn)
            return interpreter.TensorHandle(rounded.view(torch.uint8).numpy(), tl.float8e4nv)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    interpreter.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp


# Kernels run under Triton's CPU interpreter (the CPU test suite): inline PTX cannot.
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    _patch_interpreter()


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch rule: Triton kernels on CUDA tensors, torch references everywhere else."""
    return HAS_TRITON and t.is_cuda


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (132 on H100 SXM); 1 elsewhere."""
    if not torch.cuda.is_available():
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    """SM count of the device holding `t`; a nominal H100 count for the interpreter on CPU."""
    if t.is_cuda:
        return num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 132


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands get IEEE products (the reference tests are fp32-exact); 16-bit ones
    use the tensor cores' native path, for which the precision flag is ignored."""
    return "ieee" if dtype == torch.float32 else "tf32"
