"""Attention backends over the paged KV cache, behind one interface (see backend.py)."""

from rtpllm.attention.backend import AttentionBackend, AttentionMetadata, get_backend, register_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend", "register_backend"]
