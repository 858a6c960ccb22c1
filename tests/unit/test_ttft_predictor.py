"""The gateway's TTFT prediction: rates learned only while an instance is busy, pending
tokens counted exactly, no prediction (so no refusal) before anything is known."""

from __future__ import annotations

import pytest

from rtpllm.routing.ttft import TTFTPredictor


def test_no_prediction_until_seen_busy() -> None:
    p = TTFTPredictor()
    assert p.predict("a", 1000) is None
    p.observe("a", 0, waiting=0, now=0.0)
    p.observe("a", 0, waiting=0, now=1.0)  # idle: says nothing about speed
    assert p.predict("a", 1000) is None


def test_rate_from_busy_intervals_and_pending_tokens() -> None:
    p = TTFTPredictor(smoothing=1.0)
    p.add_pending("a", 3000)
    p.observe("a", 0, waiting=2, now=0.0)
    p.observe("a", 2000, waiting=1, now=1.0)  # 2000 tokens/s while busy
    assert p.rate("a") == pytest.approx(2000)
    # 3000 pending of ours + 1000 new at 2000 tokens/s.
    assert p.predict("a", 1000) == pytest.approx(2.0)
    p.remove_pending("a", 3000)
    assert p.predict("a", 1000) == pytest.approx(0.5)
    assert TTFTPredictor.retry_after_s(predicted_s=7.2, allowed_s=5.0) == 3
    assert TTFTPredictor.retry_after_s(predicted_s=5.1, allowed_s=5.0) == 1


def test_interval_that_ends_idle_is_not_a_sample() -> None:
    p = TTFTPredictor(smoothing=1.0)
    p.observe("a", 0, waiting=1, now=0.0)
    p.observe("a", 100, waiting=0, now=10.0)  # finished early in the interval: 10 tok/s would be wrong
    assert p.rate("a") is None
    p.observe("a", 100, waiting=1, now=11.0)
    p.observe("a", 600, waiting=1, now=12.0)
    assert p.rate("a") == pytest.approx(500)


def test_bunched_heartbeats_are_skipped_and_forget_clears() -> None:
    p = TTFTPredictor(smoothing=1.0, min_interval_s=0.2)
    p.observe("a", 0, waiting=1, now=0.0)
    p.observe("a", 50, waiting=1, now=0.05)  # after a stall: too short to measure
    p.observe("a", 1000, waiting=1, now=1.0)
    assert p.rate("a") == pytest.approx(1000)
    p.forget("a")
    assert p.predict("a", 10) is None
