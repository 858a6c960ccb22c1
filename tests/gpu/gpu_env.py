"""Where the GPU tests run: on CUDA at realistic shapes, on the CPU under Triton's
interpreter (TRITON_INTERPRET=1) at small ones, else nowhere (they skip).

A plain module rather than conftest.py, so test files can import it unambiguously
(several conftest.py files share one module name).
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

ON_GPU = HAS_TRITON and torch.cuda.is_available()
INTERPRET = HAS_TRITON and not ON_GPU and os.environ.get("TRITON_INTERPRET") == "1"
