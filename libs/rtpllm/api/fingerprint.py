"""`system_fingerprint`: which backend produced a response.

OpenAI documents it as the backend configuration a model runs with, to be read with
`seed`: when it changes, the same request may sample differently. Its schema says a
string (null fails strict validation). Here it is `rtpllm-<version>-<digest>`, the digest
being the serving instance's KV namespace: a hash of the checkpoint's bytes, the dtype,
KV format, TP layout and block size (rtpllm.kvcache.block_hash), so new weights or a
new numeric setup change it, and the same setup on any instance or host does not.
"""

from __future__ import annotations

import hashlib

from rtpllm import __version__

_DIGEST_CHARS = 10


def system_fingerprint(kv_namespace: bytes, model: str) -> str:
    """From the instance's KV namespace; without one (an instance that reports none,
    or before one is chosen), from the served model's name."""
    digest = kv_namespace.hex() if kv_namespace else hashlib.sha256(model.encode()).hexdigest()
    return f"rtpllm-{__version__}-{digest[:_DIGEST_CHARS]}"
