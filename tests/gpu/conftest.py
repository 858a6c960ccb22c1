"""Fixtures for the kernel tests.

They run on CUDA at realistic shapes where a GPU is present. Without one they run on the
CPU under Triton's interpreter when TRITON_INTERPRET=1 is set (small shapes, chosen at
collection time through `ON_GPU`), and are skipped otherwise, also when Triton is missing.
"""

from __future__ import annotations

import pytest
from gpu_env import INTERPRET, ON_GPU


@pytest.fixture
def kernel_device() -> str:
    """ "cuda" on a GPU machine, "cpu" under the Triton interpreter, else skip."""
    if ON_GPU:
        return "cuda"
    if INTERPRET:
        return "cpu"
    pytest.skip("needs CUDA + Triton, or TRITON_INTERPRET=1 with Triton installed")


@pytest.fixture
def cuda_device() -> str:
    """Tests that only make sense on a real GPU (whole-model runs, CUDA graphs, timing)."""
    if not ON_GPU:
        pytest.skip("needs a CUDA GPU and Triton")
    return "cuda"
