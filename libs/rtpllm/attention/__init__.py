"""Attention backends over the paged KV cache, behind one interface (see backend.py)."""

from rtpllm.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    decode_spans,
    get_backend,
    register_backend,
)

__all__ = ["AttentionBackend", "AttentionMetadata", "decode_spans", "get_backend", "register_backend"]
