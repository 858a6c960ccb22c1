"""A replay proposer for benchmarks and tests: it knows each request's reference
continuation (the target's own greedy output, recorded in an earlier run) and proposes
it with each token kept with probability `acceptance`, replaced by a wrong token
otherwise. Speed can then be measured at a chosen, realistic acceptance rate (one
measured with real weights) on random weights of any shape, where model-free proposers
would accept nothing. Not selectable from the command line."""

from __future__ import annotations

import random
from collections.abc import Sequence

from rtpllm.speculative.proposer import NO_PROPOSAL, Proposal, Proposer


class ReplayProposer(Proposer):
    name = "replay"

    def __init__(self, acceptance: float, vocab_size: int, seed: int = 0) -> None:
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
        self.acceptance = acceptance
        self.vocab_size = vocab_size
        self._rng = random.Random(seed)
        # request id -> (prompt length, reference continuation)
        self._refs: dict[str, tuple[int, list[int]]] = {}

    def add_reference(self, request_id: str, prompt_len: int, continuation: Sequence[int]) -> None:
        self._refs[request_id] = (prompt_len, list(continuation))

    def propose(self, request_id: str, tokens: Sequence[int], k: int, private: bool = False) -> Proposal:
        ref = self._refs.get(request_id)
        if ref is None or k <= 0:
            return NO_PROPOSAL
        prompt_len, continuation = ref
        pos = len(tokens) - prompt_len
        if continuation[:pos] != list(tokens[prompt_len:]):
            return NO_PROPOSAL  # the output left the reference (sampling, a stop)
        out: list[int] = []
        for token in continuation[pos : pos + k]:
            if self._rng.random() >= self.acceptance:
                token = (token + 1 + self._rng.randrange(self.vocab_size - 1)) % self.vocab_size
            out.append(token)
        return Proposal(tuple(out), (1.0,) * len(out)) if out else NO_PROPOSAL

    def forget(self, request_id: str, output_tokens: Sequence[int] | None = None) -> None:
        self._refs.pop(request_id, None)
