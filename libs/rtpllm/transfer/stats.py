"""What a finished transfer reports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TransferStats:
    """One completed transfer, as seen by one side.

    `nbytes` counts KV payload bytes (headers excluded). `seconds` runs, on the sender,
    from `open()` to the end of `finish()`; on the receiver, from the sender's `Open`
    frame to the last block verified.
    """

    backend: str
    num_blocks: int
    nbytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        """Payload throughput in GB/s (1e9 bytes)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
