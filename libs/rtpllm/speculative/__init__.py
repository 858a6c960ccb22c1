"""Speculative decoding (docs/speculative_decoding.md): proposers behind one interface,
exact verification in one batched target pass, and the adaptive policy that picks how
many tokens each request speculates in each step (down to none)."""

from rtpllm.speculative.proposer import Proposer, build_proposer

__all__ = ["Proposer", "build_proposer"]
