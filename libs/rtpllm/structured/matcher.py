"""One sequence's grammar state, advanced by output position so that feeding it the
same token twice (the async path and the read-back path both know it) is harmless."""

from __future__ import annotations

import logging

import llguidance

from rtpllm.structured.grammar import grammar_text
from rtpllm.structured.spec import StructuredOutputsParams

log = logging.getLogger(__name__)


class GrammarMatcher:
    """An llguidance matcher plus how many output tokens it has consumed.

    Preemption (recompute) keeps it as it is: a preempted request keeps its output
    tokens, so the grammar state that follows them stays right.
    """

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._m = matcher
        self.num_consumed = 0

    @classmethod
    def compile(cls, tokenizer: llguidance.LLTokenizer, params: StructuredOutputsParams) -> GrammarMatcher:
        """ValueError (llguidance's message) if the constraint does not compile."""
        try:
            grammar = grammar_text(params)
        except ValueError as exc:
            raise ValueError(f"invalid structured output ({params.kind}): {exc}") from None
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(
                f"invalid structured output ({params.kind}): {matcher.get_error().strip()[:500]}"
            )
        return cls(matcher)

    def fork(self) -> GrammarMatcher:
        """An independent copy in the same state (n > 1 samples compile once)."""
        twin = GrammarMatcher(self._m.deep_copy())
        twin.num_consumed = self.num_consumed
        return twin

    @property
    def ll(self) -> llguidance.LLMatcher:
        """The llguidance matcher (mask computation takes it)."""
        return self._m

    def advance(self, position: int, token_id: int) -> None:
        """Consume output token number `position` (0-based) unless already consumed."""
        if position < self.num_consumed:
            return
        if position != self.num_consumed:
            raise AssertionError(f"grammar fed output token {position} after only {self.num_consumed}")
        self.num_consumed += 1
        if not self._m.consume_token(token_id):
            # Cannot happen for a token sampled under this matcher's mask; the matcher
            # is now in its error state, which counts as done: the request ends rather
            # than generating unconstrained text.
            log.warning("grammar rejected token %d: %s", token_id, self._m.get_error().strip()[:300])

    @property
    def is_done(self) -> bool:
        """Nothing but EOS may follow: the output is complete (or the matcher failed)."""
        return self._m.is_stopped()

    @property
    def is_error(self) -> bool:
        return self._m.is_error()
