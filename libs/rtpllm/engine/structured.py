"""The grammar side of a step (structured outputs): each constrained sequence's matcher,
and the step's token masks, computed on a worker thread while the forward pass runs.

Per step, when a sampling row is constrained:
1. `start()`, before the forward pass is launched, hands the worker the matchers of the
   step's constrained rows. With async scheduling a row's latest token may still be on
   the device (the previous step was launched but not read back): the worker waits for
   that step's tokens, feeds them to the matchers, then computes the masks. Either way
   the masks are exact: computed after every earlier token was consumed.
2. The engine runs the forward pass meanwhile, then `MaskJob.result()` joins the worker
   and the sampler applies the masks on the device before anything else touches the
   logits (rtpllm.structured.bitmask).
3. After read-back, `advance()` feeds each sampled token to its matcher (by output
   position, so a token the worker already consumed is not consumed twice) and reports
   whether the grammar is complete, which ends the request with finish_reason "stop".

Steps without a constrained row do none of this: no job, no mask, no thread hop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from rtpllm.structured.bitmask import TokenMask
from rtpllm.structured.matcher import GrammarMatcher

if TYPE_CHECKING:
    import llguidance

    from rtpllm.engine.request import Request
    from rtpllm.tokenizer import Tokenizer


class MaskJob:
    """A step's masks being computed on the worker thread."""

    def __init__(self, future: Future[TokenMask]) -> None:
        self._future = future

    def result(self) -> TokenMask:
        return self._future.result()


class StructuredOutputs:
    """Compiles matchers for constrained requests and builds each step's masks."""

    def __init__(
        self, tokenizer: Tokenizer | None, eos_token_ids: Sequence[int], vocab_size: int, device: str
    ) -> None:
        self._tokenizer = tokenizer
        self._eos = tuple(eos_token_ids)
        self._vocab = vocab_size
        self._pin = device.startswith("cuda")
        # Built on the first constrained request: engines that never see one pay nothing
        # (the tokenizer view costs ~0.2 s for a 49k vocabulary).
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._words = 0
        self.num_live = 0  # constrained sequences added and not yet forgotten

    def _ensure_started(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            import llguidance

            from rtpllm.structured.grammar import ll_tokenizer

            if self._tokenizer is None:
                raise ValueError("structured outputs need a tokenizer, and this model has none")
            self._ll_tokenizer = ll_tokenizer(self._tokenizer, self._eos, self._vocab)
            self._words = (self._ll_tokenizer.vocab_size + 31) // 32
            # llguidance's own threads compute a batch's masks in parallel (GIL dropped);
            # half the cores leaves the rest to the forward pass running beside them.
            self._executor = llguidance.LLExecutor(num_threads=max(1, min(16, (os.cpu_count() or 2) // 2)))
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="rtpllm-grammar")
        return self._ll_tokenizer

    def add(self, children: Sequence[Request]) -> None:
        """Give each sample of a constrained request its matcher (compiled once, copied
        for n > 1). ValueError when the constraint does not compile."""
        params = children[0].params.structured_outputs
        if params is None:
            return
        first = GrammarMatcher.compile(self._ensure_started(), params)
        for i, child in enumerate(children):
            child.grammar = first if i == 0 else first.fork()
        self.num_live += len(children)

    def forget(self, children: Sequence[Request]) -> None:
        for child in children:
            if child.grammar is not None:
                child.grammar = None
                self.num_live -= 1

    def start(
        self, rows: Sequence[Request], in_flight: Callable[[], list[int]] | None, flight_rows: dict[str, int]
    ) -> MaskJob | None:
        """Start computing the masks of a step whose sampling rows are `rows` (in order).
        `in_flight`: reads the previous, still unread step's tokens (waiting for them),
        with `flight_rows` each request's row there. None when no row is constrained."""
        if not self.num_live:
            return None
        constrained = [(i, req) for i, req in enumerate(rows) if req.grammar is not None]
        if not constrained:
            return None
        # Tokens still on the device: (matcher, output position, row in the previous step).
        pending = []
        for _, req in constrained:
            if req.num_placeholders:
                assert req.grammar is not None and in_flight is not None
                pending.append((req.grammar, req.num_output_tokens - 1, flight_rows[req.request_id]))
        matchers = [req.grammar for _, req in constrained]
        index = None if len(constrained) == len(rows) else [i for i, _ in constrained]
        assert self._worker is not None
        return MaskJob(self._worker.submit(self._masks, matchers, index, pending, in_flight))

    def _masks(
        self,
        matchers: list[GrammarMatcher],
        index: list[int] | None,
        pending: list[tuple[GrammarMatcher, int, int]],
        in_flight: Callable[[], list[int]] | None,
    ) -> TokenMask:
        if pending and in_flight is not None:
            tokens = in_flight()
            for matcher, position, row in pending:
                matcher.advance(position, tokens[row])
        bits = torch.empty((len(matchers), self._words), dtype=torch.int32, pin_memory=self._pin)
        assert self._executor is not None
        self._executor.unsafe_compute_mask_ptr(
            [(m.ll, j) for j, m in enumerate(matchers)], bits.data_ptr(), self._words * 4, len(matchers)
        )
        return TokenMask(bits, index)

    @staticmethod
    def advance(req: Request, position: int, token_id: int) -> bool:
        """Feed output token `position` to the request's matcher; True when the grammar
        is complete (nothing but EOS may follow), which ends the request."""
        grammar = req.grammar
        if grammar is None:
            return False
        grammar.advance(position, token_id)
        return grammar.is_done
