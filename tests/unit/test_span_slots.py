"""model_runner._span_slots: a prompt chunk's cache slots by numpy equal the per-position
rule (slot = table[p // block_size] * block_size + p % block_size) on random spans."""

from __future__ import annotations

import random

from rtpllm.engine.model_runner import _span_slots


def test_span_slots_equal_the_per_position_rule() -> None:
    rng = random.Random(0)
    for _ in range(300):
        bs = rng.choice([1, 4, 16, 32])
        table = rng.sample(range(10_000), 64)
        start = rng.randrange(0, 64 * bs)
        end = rng.randrange(start, 64 * bs + 1)
        want = [table[p // bs] * bs + p % bs for p in range(start, end)]
        assert _span_slots(table, start, end, bs) == want, (bs, start, end)
