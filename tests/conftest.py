"""Shared fixtures: tiny random-weight checkpoints of every supported family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from rtpllm.loader.random_checkpoint import write_random_checkpoint

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# Property tests draw the same examples on every run (a CI failure reproduces locally);
# HYPOTHESIS_PROFILE=explore draws fresh ones.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# CI has 2 cores; more torch threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    # Under Triton's interpreter the kernel tests (tests/gpu/, small shapes on CPU) run;
    # their fixtures skip the ones that need a real GPU. Elsewhere `gpu` means CUDA.
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    kernel_tests = Path(__file__).parent / "gpu"
    for item in items:
        if "gpu" in item.keywords and not (interpret and kernel_tests in Path(item.fspath).parents):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per family (tied embeddings on qwen3, as the real 0.6B)."""
    root = tmp_path_factory.mktemp("ckpt")
    out: dict[str, Path] = {}
    for family in FAMILIES:
        extra = {"tie_word_embeddings": True} if family == "qwen3" else {}
        out[family] = write_random_checkpoint(root / family, family, seed=FAMILIES.index(family), **extra)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints: dict[str, Path]) -> Path:
    return tiny_checkpoints["llama"]
