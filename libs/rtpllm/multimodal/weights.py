"""Load a vision tower's tensors out of a full HF vision-language checkpoint.

A tower names its tensors relative to its own root (`blocks.0.attn.qkv.weight`); the
checkpoint stores them under a prefix that depends on who saved it: Qwen's releases use
`visual.`, transformers 5 in memory uses `model.visual.`, a standalone tower none. We
pick the first candidate prefix that holds the tower's tensors and hand the rest to the
loader, which reports whatever is missing or misshapen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from rtpllm.loader.weights import CheckpointError, LoadStats, load_checkpoint, safetensors_files


def checkpoint_tensor_names(model_dir: str | Path) -> set[str]:
    names: set[str] = set()
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names.update(f.keys())
    return names


def find_prefix(names: set[str], targets: Sequence[str], prefixes: Sequence[str]) -> str:
    """The candidate prefix under which most of `targets` exist (ties: earliest candidate)."""
    best, best_hits = None, 0
    for prefix in prefixes:
        hits = sum(prefix + t in names for t in targets)
        if hits > best_hits:
            best, best_hits = prefix, hits
    if best is None:
        raise CheckpointError(f"no vision tower tensors under any of the prefixes {list(prefixes)}")
    return best


def load_tower_weights(
    model_dir: str | Path, targets: dict[str, torch.Tensor], prefixes: Sequence[str]
) -> tuple[str, LoadStats]:
    """Copy the tower's tensors into `targets` (relative name -> destination view).

    Returns the prefix used and the loader's stats. Tensors outside the tower (the
    language model) are skipped without a warning: a full VLM checkpoint is expected.
    """
    prefix = find_prefix(checkpoint_tensor_names(model_dir), list(targets), prefixes)
    named = {prefix + name: dest for name, dest in targets.items()}
    with torch.no_grad():
        stats = load_checkpoint(model_dir, named, ignore=lambda name: True)
    return prefix, stats


def build_tower(
    make: Callable[[], nn.Module],
    model_dir: str | Path,
    prefixes: Sequence[str],
    dtype: torch.dtype,
    device: str | torch.device,
) -> Any:
    """A vision tower made by `make`, with every weight from the checkpoint in `model_dir`.

    Built on the meta device: every parameter comes from the checkpoint, so running
    torch's initializers on hundreds of millions of weights would be wasted time."""
    with torch.device("meta"):
        tower = make().to(dtype)
    tower = tower.to_empty(device=device)
    load_tower_weights(model_dir, tower.checkpoint_targets(), prefixes)
    return tower.eval()
