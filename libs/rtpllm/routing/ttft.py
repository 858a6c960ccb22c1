"""Predicted time to first token, for refusing early what cannot meet its deadline.

ARCHITECTURE rule 3: a request that cannot meet its deadline is refused at once (429 with
Retry-After), never queued forever. The gateway predicts, per instance,

    TTFT = (prompt tokens ahead of it on that instance + its own uncached tokens) / prefill rate

- *Tokens ahead*: this gateway's requests on the instance that have no first token yet
  (it knows them exactly), plus what the instance reports waiting beyond those.
- *Prefill rate*: learned from the instance's heartbeats, as the rate at which its
  count of prefilled prompt tokens grows while it has prefill work queued (an idle
  instance says nothing about its speed). An exponential average over busy intervals.

Until an instance has been seen busy there is no prediction, and nothing is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Rate:
    last_tokens: int | None = None
    last_time: float = 0.0
    was_busy: bool = False
    tokens_per_s: float | None = None


class TTFTPredictor:
    """Per-instance prefill rates and this gateway's pending prompt tokens.

    `smoothing`: weight of the newest busy interval in the average. `min_interval_s`:
    intervals shorter than this (heartbeats bunched up after a stall) are skipped.
    """

    def __init__(self, smoothing: float = 0.3, min_interval_s: float = 0.2) -> None:
        self.smoothing = smoothing
        self.min_interval_s = min_interval_s
        self._rates: dict[str, _Rate] = {}
        self._pending: dict[str, int] = {}  # instance -> prompt tokens of our requests without a first token

    def observe(self, instance_id: str, prompt_tokens_total: int, waiting: int, now: float) -> None:
        """A heartbeat: the instance's cumulative prefilled prompt tokens and its queue."""
        rate = self._rates.setdefault(instance_id, _Rate())
        busy = waiting > 0 or self._pending.get(instance_id, 0) > 0
        if rate.last_tokens is not None:
            elapsed = now - rate.last_time
            if elapsed < self.min_interval_s:
                return  # keep the older sample: the next interval is measured from it
            grown = prompt_tokens_total - rate.last_tokens
            # Busy at both ends: the instance prefilled all through the interval.
            if rate.was_busy and busy and grown > 0:
                sample = grown / elapsed
                rate.tokens_per_s = sample if rate.tokens_per_s is None else (
                    self.smoothing * sample + (1 - self.smoothing) * rate.tokens_per_s
                )
        rate.last_tokens, rate.last_time, rate.was_busy = prompt_tokens_total, now, busy

    def forget(self, instance_id: str) -> None:
        self._rates.pop(instance_id, None)
        self._pending.pop(instance_id, None)

    def add_pending(self, instance_id: str, tokens: int) -> None:
        self._pending[instance_id] = self._pending.get(instance_id, 0) + tokens

    def remove_pending(self, instance_id: str, tokens: int) -> None:
        left = self._pending.get(instance_id, 0) - tokens
        if left > 0:
            self._pending[instance_id] = left
        else:
            self._pending.pop(instance_id, None)

    def rate(self, instance_id: str) -> float | None:
        rate = self._rates.get(instance_id)
        return rate.tokens_per_s if rate is not None else None

    def predict(self, instance_id: str, new_tokens: int) -> float | None:
        """Seconds until a request of `new_tokens` uncached prompt tokens sent now would
        get its first token on this instance, or None while its rate is unknown."""
        tokens_per_s = self.rate(instance_id)
        if not tokens_per_s:
            return None
        return (self._pending.get(instance_id, 0) + new_tokens) / tokens_per_s

    @staticmethod
    def retry_after_s(predicted_s: float, allowed_s: float) -> int:
        """A Retry-After for a refused request: about when the queue ahead of it will
        have drained enough for it to fit (at least 1 s)."""
        return max(1, math.ceil(predicted_s - allowed_s))
