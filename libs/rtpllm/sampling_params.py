"""Per-request generation parameters (vLLM-compatible names), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rtpllm.structured.spec import StructuredOutputsParams

# Temperatures below this are treated as greedy: dividing logits by ~0 overflows.
GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
# Token ids travel as int32 (kernels, protocol); any id at or above this is no token of
# any vocabulary and is refused up front (a huge one would not even serialize).
MAX_TOKEN_ID = 1 << 31
# OpenAI's range for logit_bias values: +-100 already bans or forces a token.
MAX_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams:
    """How to sample one request. Invalid values raise ValueError naming the field."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # <= 0 disables
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs per generated token (0: sampled only)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Added to the logits before sampling (token id -> bias in [-100, 100]); raw logprobs
    # stay the model's, as vLLM reports them.
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # only these may be sampled (vLLM)
    # The output must match a JSON schema, regex, choice or grammar (structured
    # outputs; docs/structured_outputs.md).
    structured_outputs: StructuredOutputsParams | None = None
    # "delta": an output after every step with what is new (streaming); "final": one
    # output when the request ends, with everything (offline generation skips the
    # per-step bookkeeping).
    output_kind: str = "delta"
    # False: never speculate for this request (an engine started with --speculative
    # does by default; docs/speculative_decoding.md). Outputs are the same either way.
    speculative: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k == -1:  # vLLM's spelling of "disabled"
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be -1 or 0 (disabled) or >= 1")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "must be in (0, 10]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be >= 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise bad(name, f"must be in [0, {MAX_LOGPROBS}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or not 0 <= t < MAX_TOKEN_ID for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids in [0, {MAX_TOKEN_ID}), got {self.stop_token_ids!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(1 << 63) <= self.seed < 1 << 64):
            raise bad("seed", "must be an integer that fits 64 bits")
        if self.logit_bias is not None:
            for token, bias in self.logit_bias.items():
                if not isinstance(token, int) or not 0 <= token < MAX_TOKEN_ID:
                    raise ValueError(f"logit_bias keys must be token ids in [0, {MAX_TOKEN_ID}), got {token!r}")
                if not isinstance(bias, int | float) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}")
        if self.allowed_token_ids is not None and (
            not self.allowed_token_ids
            or any(not isinstance(t, int) or not 0 <= t < MAX_TOKEN_ID for t in self.allowed_token_ids)
        ):
            raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got {self.allowed_token_ids!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", "must be a StructuredOutputsParams")
        if self.output_kind not in ("delta", "final"):
            raise bad("output_kind", "must be 'delta' or 'final'")
        if not isinstance(self.speculative, bool):
            raise bad("speculative", "must be a boolean")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def for_child(self, index: int) -> SamplingParams:
        """Parameters of the index-th of n parallel samples: n=1 and a distinct seed."""
        seed = None if self.seed is None else (self.seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF
        return replace(self, n=1, seed=seed)
