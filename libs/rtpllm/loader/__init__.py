"""Checkpoint loading into pre-allocated model parameters."""

from rtpllm.loader.weights import CheckpointError, load_checkpoint, safetensors_files

__all__ = ["CheckpointError", "load_checkpoint", "safetensors_files"]
