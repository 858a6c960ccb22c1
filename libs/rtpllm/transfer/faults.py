"""Fault injection for tests only.

Production code reads these attributes and never sets them; tests set them to exercise
paths that a healthy network never takes, and reset them afterwards.
"""

from __future__ import annotations

# The sender flips one byte of the next N payloads after checksumming them (tcp, shm: in
# a private copy, never in the pool; cuda_ipc: in the checksum it announces), so the
# receiver must report ChecksumMismatch.
corrupt_payloads: int = 0


def take_corruption() -> bool:
    """True (and one fewer left) when the next payload is to be corrupted."""
    global corrupt_payloads
    if corrupt_payloads > 0:
        corrupt_payloads -= 1
        return True
    return False
