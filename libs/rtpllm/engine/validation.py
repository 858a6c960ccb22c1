"""Checks on a prompt that every entry point applies the same way (torch-free, so a
worker can refuse a request before it is queued)."""

from __future__ import annotations

from array import array
from collections.abc import Sequence


def validate_prompt(token_ids: Sequence[int], vocab_size: int, max_model_len: int) -> None:
    """Raise ValueError, with a message fit for an API client, for an empty prompt, a
    token id outside the vocabulary, or a prompt that leaves no room to generate."""
    if not token_ids:
        raise ValueError("prompt is empty")
    try:
        # C-speed type check and min/max: prompts run to hundreds of thousands of ids.
        packed = array("q", token_ids)
    except (TypeError, OverflowError):
        packed = None
    if packed is None or min(packed) < 0 or max(packed) >= vocab_size:
        bad = next(t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size)
        raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab_size})")
    if len(token_ids) >= max_model_len:
        raise ValueError(
            f"prompt has {len(token_ids)} tokens but the model's context length is {max_model_len}; "
            "shorten the prompt"
        )
