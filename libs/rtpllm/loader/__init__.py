"""Checkpoint loading into pre-allocated model parameters.

`load_checkpoint_fast` is what engines use (file-order extents, parallel reads,
overlapped host-to-device copies); `load_checkpoint` is the simple reference it is
tested against.
"""

from rtpllm.loader.fast_loader import load_checkpoint_fast
from rtpllm.loader.progress import ProgressPrinter
from rtpllm.loader.weights import CheckpointError, LoadStats, load_checkpoint, safetensors_files

__all__ = ["CheckpointError", "LoadStats", "ProgressPrinter", "load_checkpoint", "load_checkpoint_fast", "safetensors_files"]
