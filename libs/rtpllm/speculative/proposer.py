"""The proposer interface and the registry that builds one from `--speculative`.

A proposer guesses the next tokens of a sequence cheaply; the target model checks
them all in one pass (verify.py). Proposers here are model-free: they return token ids
only, so their proposal distribution is a point mass on each guessed token (what
rejection sampling needs to know about them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Proposal:
    """Guessed continuation of a sequence and the proposer's confidence in each token
    (its estimate of the chance the token is right given the ones before it; 1.0 when
    the proposer has no estimate). `tokens` may be shorter than asked, or empty."""

    tokens: tuple[int, ...] = ()
    confidence: tuple[float, ...] = ()


NO_PROPOSAL = Proposal()


class Proposer(ABC):
    """Proposes draft tokens per sequence. One instance serves every request of an
    engine; per-request state is keyed by request id and dropped by `forget`."""

    name: str = ""

    @abstractmethod
    def propose(self, request_id: str, tokens: Sequence[int], k: int, private: bool = False) -> Proposal:
        """Up to `k` tokens that may follow `tokens` (the sequence so far: prompt and
        accepted outputs). `private`: use nothing learned from other requests, so the
        proposal depends on this sequence alone (seeded sampled requests stay
        reproducible whatever ran before them)."""

    @abstractmethod
    def forget(self, request_id: str, output_tokens: Sequence[int] | None = None) -> None:
        """The request is gone: drop its state. `output_tokens`: its outputs, when it
        finished normally (a proposer that learns across requests may keep them)."""


def build_proposer(method: str, **options: int | float) -> Proposer:
    """The proposer named by `--speculative` ("ngram", "suffix"). Raises ValueError
    naming the choices for anything else."""
    # Imported here: each proposer module stays independent of the others.
    if method == "ngram":
        from rtpllm.speculative.ngram import NgramProposer

        return NgramProposer(**options)  # type: ignore[arg-type]
    if method == "suffix":
        from rtpllm.speculative.suffix import SuffixProposer

        return SuffixProposer(**options)  # type: ignore[arg-type]
    raise ValueError(f"unknown speculative method {method!r}; use 'ngram' or 'suffix'")
