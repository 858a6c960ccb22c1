"""From sampled token ids to user-visible outputs: stop conditions, incremental text,
stop strings (never streamed half-way), logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from rtpllm.engine.request import Request
from rtpllm.outputs import CompletionOutput, Logprob, PositionLogprobs
from rtpllm.tokenizer import IncrementalDetokenizer, Tokenizer

LogprobRow = tuple[float, int, list[int], list[float]]


@dataclass
class _TextState:
    detok: IncrementalDetokenizer | None
    text: str = ""  # full text so far (after any stop-string truncation)
    emitted: int = 0  # characters already handed out
    max_stop_len: int = 0
    cumulative_logprob: float = 0.0
    pending_logprobs: list[PositionLogprobs] = field(default_factory=list)
    emitted_tokens: int = 0


@dataclass
class Finish:
    reason: str
    stop_reason: int | str | None = None


class OutputProcessor:
    """Keeps per-request text state; one call per sampled token."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _TextState] = {}

    def add(self, req: Request) -> None:
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer.decode, req.prompt_token_ids, req.params.skip_special_tokens)
        max_stop = max((len(s) for s in req.params.stop), default=0)
        self._states[req.request_id] = _TextState(detok=detok, max_stop_len=max_stop)

    def remove(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def process_token(
        self, req: Request, token_id: int, logprobs: LogprobRow | None, ends: bool = False
    ) -> Finish | None:
        """Record a sampled token (already appended to the request); return why it
        finished, if it did. `ends`: the caller knows this token completes the output
        (its grammar allows nothing more: structured outputs), a "stop" whose token,
        unlike EOS, belongs to the text."""
        st = self._states[req.request_id]
        if logprobs is not None:
            st.cumulative_logprob += logprobs[0]
            st.pending_logprobs.append(self.format_logprobs(token_id, logprobs))
        p = req.params
        n_out = req.num_output_tokens - req.num_placeholders  # later tokens are still in flight
        finish: Finish | None = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token_id in req.eos_token_ids:
                finish = Finish("stop")
            elif token_id in p.stop_token_ids:
                finish = Finish("stop", token_id)
        # A token that ends the request (EOS, stop id) is kept in token_ids, not in text.
        if st.detok is not None and finish is None:
            delta = st.detok.step(token_id)
            if finish is None and (n_out >= req.max_output_tokens or ends):
                delta += st.detok.flush()
            if delta:
                before = len(st.text)
                st.text += delta
                if finish is None and p.stop and n_out >= p.min_tokens:
                    finish = self._check_stop_strings(st, p.stop, before, p.include_stop_str_in_output)
        if finish is None and ends:
            finish = Finish("stop")
        if finish is None and n_out >= req.max_output_tokens:
            finish = Finish("length")
        return finish

    @staticmethod
    def _check_stop_strings(st: _TextState, stops: list[str], before: int, include: bool) -> Finish | None:
        # Only the new text (plus the overlap a stop string could straddle) is searched.
        search_from = max(0, before - st.max_stop_len + 1)
        best: tuple[int, str] | None = None
        for s in stops:
            idx = st.text.find(s, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        st.text = st.text[: idx + len(s)] if include else st.text[:idx]
        return Finish("stop", s)

    def take_delta(self, req: Request, finished: bool) -> CompletionOutput:
        """New tokens/text/logprobs since the last call. Text that might be the start of a
        stop string is held back until it cannot be."""
        st = self._states[req.request_id]
        limit = len(st.text)
        if not finished and st.max_stop_len > 1:
            limit = max(st.emitted, len(st.text) - st.max_stop_len + 1)
        text = st.text[st.emitted : limit]
        st.emitted = limit
        known = len(req.output_token_ids) - req.num_placeholders  # in-flight tokens come later
        tokens = req.output_token_ids[st.emitted_tokens : known]
        st.emitted_tokens = known
        logprobs = None
        if req.params.logprobs is not None:
            logprobs, st.pending_logprobs = st.pending_logprobs, []
        return CompletionOutput(
            index=req.index,
            text=text,
            token_ids=list(tokens),
            cumulative_logprob=st.cumulative_logprob if req.params.logprobs is not None else None,
            logprobs=logprobs,
            finish_reason=req.finish_reason if finished else None,
            stop_reason=req.stop_reason if finished else None,
        )

    def format_logprobs(self, token_id: int, row: LogprobRow) -> PositionLogprobs:
        chosen, rank, top_ids, top_vals = row
        out: PositionLogprobs = {token_id: Logprob(chosen, rank, self._token_text(token_id))}
        for r, (tid, val) in enumerate(zip(top_ids, top_vals, strict=True), start=1):
            if tid not in out:
                out[tid] = Logprob(val, r, self._token_text(tid))
        return out

    def _token_text(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
