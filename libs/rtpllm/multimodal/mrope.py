"""Qwen2-VL's multimodal rotary positions (M-RoPE) of a prompt, as HF's `get_rope_index`.

Every token gets three positions (temporal, height, width). Text tokens get the same
value on all three, counting on from the previous token. An image's tokens take their
(t, h, w) place in the merged patch grid, offset by the position where the image
starts; the text after it continues from that start plus the grid's larger side. A
prompt with images thus ends at a position below its length: the difference, `delta`
(<= 0), is added to every later position (decode), on all three axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rtpllm.multimodal.inputs import ImageInput


def mrope_positions(
    num_tokens: int, images: Sequence[ImageInput], spatial_merge_size: int
) -> tuple[np.ndarray, int]:
    """(positions int64 [3, num_tokens], delta) for a prompt whose images are `images`
    (each one placeholder run, with its grid)."""
    positions = np.empty((3, num_tokens), dtype=np.int64)
    current = 0  # the next text position
    cursor = 0  # the next prompt index
    for i, image in enumerate(images):
        if len(image.runs) != 1 or image.grid_thw is None:
            raise ValueError(f"image {i}: M-RoPE needs one placeholder run and a grid_thw")
        offset, length = image.runs[0]
        positions[:, cursor:offset] = np.arange(current, current + offset - cursor)
        current += offset - cursor
        t, h, w = image.grid_thw
        h, w = h // spatial_merge_size, w // spatial_merge_size
        if t * h * w != length:
            raise ValueError(
                f"image {i}: grid {image.grid_thw} makes {t * h * w} tokens, the run has {length}"
            )
        grid = np.indices((t, h, w)).reshape(3, -1)
        positions[:, offset : offset + length] = grid + current
        # HF advances by the larger spatial side only, whatever t (t is 1 for images).
        current += max(h, w)
        cursor = offset + length
    positions[:, cursor:] = np.arange(current, current + num_tokens - cursor)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta
