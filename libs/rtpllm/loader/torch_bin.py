"""`pytorch_model.bin` checkpoints: the tensors' names and shapes, and loading them into
target views with `weights.load_checkpoint`'s contract.

Safetensors is the format everything else here reads; this exists for EAGLE heads,
whose published checkpoints mostly ship as a single `pytorch_model.bin` (a pickled
state dict). It is read with `torch.load(weights_only=True)`, which unpickles tensors
and plain containers only (no code), memory-mapped so only the tensors copied are read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from rtpllm.loader.shard import Shard, Target
from rtpllm.loader.weights import CheckpointError, LoadStats

log = logging.getLogger(__name__)

BIN_NAME = "pytorch_model.bin"


def has_torch_bin(model_dir: str | Path) -> bool:
    return (Path(model_dir) / BIN_NAME).is_file()


def read_torch_bin(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of `model_dir/pytorch_model.bin` (CPU tensors, memory-mapped)."""
    path = Path(model_dir) / BIN_NAME
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a pickle that is not a plain state dict
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def load_torch_bin(
    model_dir: str | Path,
    targets: dict[str, Target],
    *,
    optional: Iterable[str] = (),
    ignore: Callable[[str], bool] = lambda name: False,
) -> LoadStats:
    """Copy every tensor named in `targets` from `pytorch_model.bin` into its view: the
    same semantics and errors as `weights.load_checkpoint` (missing tensors and shape
    mismatches raise CheckpointError naming the tensor)."""
    start = time.perf_counter()
    state = read_torch_bin(model_dir)
    nbytes = 0
    for name, dest in targets.items():
        src = state.get(name)
        if src is None:
            continue
        if isinstance(dest, Shard):
            src, dest = src.narrow(dest.dim, dest.start, dest.dest.shape[dest.dim]), dest.dest
        if tuple(src.shape) != tuple(dest.shape):
            raise CheckpointError(f"tensor {name} in {model_dir}/{BIN_NAME} has shape {tuple(src.shape)}, model expects {tuple(dest.shape)}")
        dest.copy_(src)
        nbytes += src.numel() * src.element_size()
    missing = sorted(set(targets) - set(state) - set(optional))
    if missing:
        raise CheckpointError(f"checkpoint in {model_dir} lacks tensors the model needs: {', '.join(missing[:5])}")
    for name in state:
        if name not in targets and not ignore(name):
            log.warning("checkpoint tensor %s is not used by the model", name)
    count = sum(1 for n in targets if n in state)
    return LoadStats(bytes_read=nbytes, seconds=time.perf_counter() - start, num_tensors=count)
