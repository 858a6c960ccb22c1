"""The proposer interface and the registry that builds one from `--speculative`.

A proposer guesses the next tokens of a sequence cheaply; the target model checks
them all in one pass (verify.py). Model-free proposers (n-gram, suffix) return token
ids only, so their proposal distribution is a point mass on each guessed token. A draft
model samples its tokens from a distribution and returns it with them (`Proposal.probs`),
which rejection sampling needs to stay exact. An EAGLE head also reads the target's
hidden states, which the engine hands over after each step (`observe_features`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rtpllm.speculative.adaptive import PassCost

if TYPE_CHECKING:
    from rtpllm.engine.request import Request


@dataclass(frozen=True)
class Proposal:
    """Guessed continuation of a sequence and the proposer's confidence in each token
    (its estimate of the chance the token is right given the ones before it; 1.0 when
    the proposer has no estimate). `tokens` may be shorter than asked, or empty.

    `probs`: the distribution each token was sampled from ([len(tokens), vocab]
    probabilities on the target's device), for a proposer that samples (a draft model
    on a sampled request); None means a point mass on each token."""

    tokens: tuple[int, ...] = ()
    confidence: tuple[float, ...] = ()
    probs: torch.Tensor | None = field(default=None, compare=False)


NO_PROPOSAL = Proposal()


@dataclass(frozen=True)
class FeatureRows:
    """A request's rows in a target step's features (`Proposer.observe_features`):
    `count` target positions from `position`, at packed row `row`."""

    request: Request
    position: int
    row: int
    count: int


class Proposer(ABC):
    """Proposes draft tokens per sequence. One instance serves every request of an
    engine; per-request state is keyed by request id and dropped by `forget`."""

    name: str = ""
    # The target hidden states the proposer reads (DecoderLM.set_feature_layers), for a
    # head that drafts from them (EAGLE); None: the proposer reads tokens only.
    feature_layers: tuple[int, ...] | None = None

    @abstractmethod
    def propose(self, request_id: str, tokens: Sequence[int], k: int, private: bool = False) -> Proposal:
        """Up to `k` tokens that may follow `tokens` (the sequence so far: prompt and
        accepted outputs). `private`: use nothing learned from other requests, so the
        proposal depends on this sequence alone (seeded sampled requests stay
        reproducible whatever ran before them)."""

    def propose_batch(self, batch: Sequence[tuple[Request, int]]) -> list[Proposal]:
        """Proposals for a step's requests at once: up to `k` tokens after each
        request's tokens so far (every one of them known on the host), in batch order.
        The default asks `propose` request by request; a proposer that runs a model
        overrides it to run one batched pass per draft position for the whole batch."""
        return [
            self.propose(req.request_id, req.all_token_ids, k, private=req.generator is not None and not req.params.greedy)
            for req, k in batch
        ]

    def cost(self, requests: Sequence[Request]) -> PassCost | None:
        """For a proposer that runs a model (a batched pass per draft position): what
        its passes would add to a step if these requests drafted, from its measured pass
        times, for the adaptive policy to weigh. None (the default) where proposing
        costs next to nothing beside a target step (model-free proposers)."""
        return None

    def observe_features(self, rows: Sequence[FeatureRows], features: torch.Tensor) -> None:  # noqa: B027  (a hook)
        """After a target step, for a proposer with `feature_layers`: `features` holds
        every packed row's hidden states ([rows, width], on the device; valid only during
        this call), `rows` say which belong to requests that may speculate (only a
        verified request's accepted positions). Default: nothing to keep."""

    @abstractmethod
    def forget(self, request_id: str, output_tokens: Sequence[int] | None = None) -> None:
        """The request is gone: drop its state. `output_tokens`: its outputs, when it
        finished normally (a proposer that learns across requests may keep them)."""

    def recover(self) -> None:  # noqa: B027  (a hook: most proposers keep nothing to drop)
        """A proposal failed part-way: drop whatever per-request state it may have left
        half-updated (every request starts over on its next proposal). Default: none
        to drop."""


def build_proposer(method: str, **options: int | float) -> Proposer:
    """The model-free proposer named by `--speculative` ("ngram", "suffix"). Raises
    ValueError naming the choices for anything else. A draft model ("draft") or an EAGLE
    head ("eagle") is loaded by the engine (`DraftModelProposer.load`,
    `EagleProposer.load`): its KV shares the engine's memory."""
    # Imported here: each proposer module stays independent of the others.
    if method == "ngram":
        from rtpllm.speculative.ngram import NgramProposer

        return NgramProposer(**options)  # type: ignore[arg-type]
    if method == "suffix":
        from rtpllm.speculative.suffix import SuffixProposer

        return SuffixProposer(**options)  # type: ignore[arg-type]
    if method in ("draft", "eagle"):
        raise ValueError(f"a {method!r} proposer is built by the engine, from SpeculativeConfig.draft_model")
    raise ValueError(f"unknown speculative method {method!r}; use 'ngram', 'suffix', 'draft' or 'eagle'")
