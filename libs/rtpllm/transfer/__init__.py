"""The KV data plane: ships KV blocks from a prefill engine's pool to a decode engine's.

Bulk KV never goes over NATS (ARCHITECTURE rule 2). A decode instance runs a KVReceiver
and announces its KVEndpoint; a prefill instance's KVSender opens a transfer to it and
sends blocks as they are computed. Backends: tcp (anywhere), shm (same host), cuda_ipc
(same host, GPU to GPU). See docs/transfer.md.
"""

from rtpllm.transfer.endpoint import KVEndpoint
from rtpllm.transfer.errors import (
    ChecksumMismatch,
    TransferAborted,
    TransferError,
    TransferRefused,
    TransferTimeout,
)
from rtpllm.transfer.incoming import IncomingTransfer
from rtpllm.transfer.layout import KVLayout
from rtpllm.transfer.outgoing import OutgoingTransfer
from rtpllm.transfer.receiver import KVReceiver
from rtpllm.transfer.sender import KVSender
from rtpllm.transfer.stats import TransferStats

__all__ = [
    "ChecksumMismatch",
    "IncomingTransfer",
    "KVEndpoint",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "OutgoingTransfer",
    "TransferAborted",
    "TransferError",
    "TransferRefused",
    "TransferStats",
    "TransferTimeout",
]
