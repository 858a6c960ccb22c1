"""KV tiers across processes with a real Redis: a prefix computed by one instance is
served as a hit to another through Redis, a restarted instance finds it again, and
with Redis stopped requests still succeed (as misses)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtpllm.runtime.stack import Stack
from tests.integration.support import ask, client_for, get, restart_one_worker, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TIER_ARGS = ["--kv-host-gib", "0.01", "--kv-redis", "--block-size", "16"]
PROMPT = [(17 * i + 3) % 300 for i in range(160)]  # 10 full blocks


@pytest.fixture(scope="module")
def tiered(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("tier-logs")
    with running_stack(tiny_model, log_dir, workers=2, worker_args=TIER_ARGS, gateway_args=["--router", "round-robin"]) as stack:
        yield stack


def test_prefix_moves_between_instances_through_redis(tiered: Stack) -> None:
    client = client_for(tiered)
    text, cached = ask(client, PROMPT + [1])  # instance A computes it (round-robin: A, B, A, ...)
    assert cached == 0
    time.sleep(1.0)  # Redis writes are write-behind
    text_b, cached_b = ask(client, PROMPT + [2])  # instance B has never seen it
    assert cached_b == 160, "B restored all 10 blocks from Redis"
    metrics = get(tiered, "/metrics").text
    assert 'tier="redis"' in metrics

    # Restart B (a new process, empty pool and host tier): Redis still has the prefix.
    restart_one_worker(tiered)
    hits = [ask(client, PROMPT + [3 + i])[1] for i in range(2)]  # one lands on the new instance
    assert min(hits) == 160, hits


def test_redis_down_degrades_to_misses(tiered: Stack) -> None:
    client = client_for(tiered)
    assert tiered.redis is not None
    tiered.redis.stop(5)
    fresh = [(23 * i + 11) % 300 for i in range(96)]
    results = [ask(client, fresh + [i]) for i in range(4)]
    assert all(text for text, _ in results), "requests succeed without Redis"
