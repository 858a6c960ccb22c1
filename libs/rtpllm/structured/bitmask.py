"""A batch's grammar masks applied to logits, on the logits' device.

A mask row is llguidance's bitmask: 32 tokens per int32 word, token t allowed when bit
t % 32 of word t // 32 is set. It is built on the host and crosses to the device as
bits (1/32 of a float row); the unpacking and the fill run where the logits are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TokenMask:
    """A step's grammar masks: `bits[i]` is the mask of logits row `rows[i]`.

    `bits` is [len(rows), words] int32 on the host (pinned on CUDA, so the upload does
    not wait); `rows` is None when every row of the batch is constrained, in order."""

    bits: torch.Tensor
    rows: list[int] | None

    def apply(self, logits: torch.Tensor) -> None:
        apply_token_bitmask(logits, self.bits, self.rows)


def unpack_bitmask(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, words] int32 -> [R, vocab] bool (True: allowed). Tokens past the mask's words
    (logits padded past the tokenizer's vocabulary) are not allowed."""
    as_bytes = bits.contiguous().view(torch.uint8)  # little-endian: token t is byte t // 8, bit t % 8
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    allowed = ((as_bytes.unsqueeze(-1) >> shifts) & 1).view(bits.shape[0], -1).bool()
    width = allowed.shape[1]
    if width >= vocab:
        return allowed[:, :vocab]
    return torch.nn.functional.pad(allowed, (0, vocab - width), value=False)


def _disallowed_on_host(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, words] int32 on the host -> [R, vocab] bool (True: not allowed), through
    numpy's C unpacking: 4x faster than the tensor ops on a CPU (which also spend a
    full-size pass on each `~` and `.bool()`)."""
    flags = np.unpackbits(np.invert(bits.numpy().view(np.uint8)), axis=1, bitorder="little")
    width = flags.shape[1]
    flags = (
        flags[:, :vocab] if width >= vocab else np.pad(flags, ((0, 0), (0, vocab - width)), constant_values=1)
    )
    return torch.from_numpy(flags).view(torch.bool)  # 0/1 bytes: a bool tensor as they are


def apply_token_bitmask(logits: torch.Tensor, bits: torch.Tensor, rows: list[int] | None = None) -> None:
    """Set the disallowed logits of the masked rows to -inf, in place. `bits`: host or
    device int32 [R, words]; `rows`: the logits row of each mask row (None: all rows)."""
    device = logits.device
    cuda = device.type == "cuda"
    if device.type == "cpu" and bits.device.type == "cpu":
        disallowed = _disallowed_on_host(bits, logits.shape[1])
    else:
        # On the device: only the bits cross (1/32 of a float row), unpacked there.
        disallowed = ~unpack_bitmask(bits.to(device, non_blocking=cuda), logits.shape[1])
    if rows is None:
        logits.masked_fill_(disallowed, float("-inf"))
        return
    index = torch.tensor(rows, dtype=torch.long)
    index = index.pin_memory().to(device, non_blocking=True) if cuda else index
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(disallowed, float("-inf")))
