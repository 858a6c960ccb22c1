"""Errors of the KV data plane, and the codes that carry them across the wire.

A receiver that fails a transfer tells the sender with an `Error` frame carrying one of
these codes; the sender raises the matching class, so both ends report the same cause.
"""

from __future__ import annotations

# Error code of a handshake refusal that is not final: the sender tries its next backend.
UNAVAILABLE = "unavailable"


class TransferError(RuntimeError):
    """Base of every data-plane failure."""

    code = "error"


class TransferTimeout(TransferError):
    """A lease ran out (receiver) or the peer made no progress within the timeout (sender)."""

    code = "timeout"


class TransferRefused(TransferError):
    """The peer refused: layout/namespace mismatch, unknown transfer, bad block range,
    duplicate frame, protocol violation."""

    code = "refused"


class ChecksumMismatch(TransferError):
    """A payload's checksum did not match its data after landing."""

    code = "checksum"


class TransferAborted(TransferError):
    """The other side aborted or cancelled the transfer, or the connection dropped."""

    code = "aborted"


_BY_CODE: dict[str, type[TransferError]] = {
    cls.code: cls for cls in (TransferTimeout, TransferRefused, ChecksumMismatch, TransferAborted)
}


def error_from_code(code: str, message: str) -> TransferError:
    """The exception a sender raises for an `Error` frame (unknown codes: the base class)."""
    return _BY_CODE.get(code, TransferError)(message)
