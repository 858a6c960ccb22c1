"""Payload checksums.

tcp and shm payloads are host bytes: CRC-32 (zlib, ~4 GB/s per core, releases the GIL),
computed by the sender before the bytes leave and by the receiver after they landed.

cuda_ipc payloads never leave the GPU, so their checksum is computed there on both sides:
a position-weighted sum over the 32-bit words w_i of the data (16- or 8-bit words when
the size is not a multiple of 4):

    S = sum_i w_i * (i + 1)   mod 2^64     (w_i sign-extended to 64 bits)

Any corruption of one word changes S (|delta * (i+1)| < 2^64 and is not zero), and so does
swapping two different words (the change is (w_a - w_b)(a - b)), a block landing in the
wrong place, or stale data left where a copy did not happen. It is not cryptographic: a
change crafted to cancel out, or (rarely) several random corruptions, can keep S. It
guards against bugs of the copy path (wrong ids, missed synchronisation), not attackers.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch


def crc32(buffers: Iterable[memoryview]) -> int:
    """CRC-32 of the concatenation of `buffers`."""
    crc = 0
    for buf in buffers:
        crc = zlib.crc32(buf, crc)
    return crc


def _words(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1).view(torch.uint8)
    for dtype, size in ((torch.int32, 4), (torch.int16, 2)):
        if flat.numel() % size == 0:
            return flat.view(dtype)
    return flat


_weights: dict[tuple[torch.device, int], torch.Tensor] = {}


def _position_weights(n: int, device: torch.device) -> torch.Tensor:
    """1, 2, ..., n as int64, cached per device and stream: only work on the stream
    that made it ever reads it, so replacing it with a longer one is safe."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream)
    weights = _weights.get(key)
    if weights is None or weights.numel() < n:
        weights = _weights[key] = torch.arange(1, max(n, 1 << 16) + 1, dtype=torch.int64, device=device)
    return weights[:n]


class WeightedSum:
    """Accumulates S over a sequence of tensors as if they were one concatenated buffer;
    stays on the tensors' device until `value()` (one sync). Two passes over the data
    (a fused widen-multiply into int64, then the sums)."""

    def __init__(self, device: torch.device) -> None:
        self._device = torch.device(device)
        self._acc = torch.zeros((), dtype=torch.int64, device=self._device)
        self._pos = 0
        self._word: torch.dtype | None = None

    def update(self, x: torch.Tensor) -> None:
        w = _words(x)
        if self._word is None:
            self._word = w.dtype
        elif w.dtype != self._word:
            raise ValueError("WeightedSum over tensors of different word sizes")
        n = w.numel()
        # sum w_i * (pos + i + 1) = sum w_i * (i + 1) + pos * sum w_i, all mod 2^64.
        self._acc += (w * _position_weights(n, self._device)).sum()
        if self._pos:
            self._acc += self._pos * w.sum(dtype=torch.int64)
        self._pos += n

    def value(self) -> int:
        return int(self._acc.item())
