"""Cache-aware routing with real processes: requests sharing a prefix land where it is
cached (KV events over NATS), and a gateway started later learns the instances' caches
from snapshots instead of starting blind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from rtpllm.runtime.stack import Stack
from tests.integration.support import MODEL_NAME, ExtraGateway, client_for, get, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def routed(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    log_dir = tmp_path_factory.mktemp("routing-logs")
    with running_stack(tiny_model, log_dir, workers=3, gateway_args=["--router", "cache-aware"]) as stack:
        yield stack, log_dir


def cached_tokens(client: openai.OpenAI, prompt: list[int]) -> int:
    resp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    details = resp.usage.prompt_tokens_details
    return details.cached_tokens if details is not None else 0


def test_shared_prefixes_land_where_they_are_cached(routed: tuple[Stack, Path]) -> None:
    stack, log_dir = routed
    client = client_for(stack)
    systems = [[(31 * s + i) % 300 for i in range(96)] for s in range(3)]
    hits = []
    for turn in range(4):
        for s, system in enumerate(systems):
            hits.append(cached_tokens(client, system + [turn, s, 7]))
    # The first request of each system prompt computes it; every later one finds its
    # 96 tokens (6 blocks of 16) cached on the instance it was routed to.
    assert hits[:3] == [0, 0, 0]
    assert all(h >= 96 for h in hits[3:]), hits
    items = get(stack, "/instances").json()["instances"]
    assert sum(i["cached_blocks"] for i in items) >= 3 * 6
    metrics = get(stack, "/metrics").text
    assert 'rtpllm_routing_decisions_total{policy="cache-aware",reason="cache"} 9.0' in metrics

    # A gateway that starts now has seen no events: it asks the instances for snapshots.
    late = ExtraGateway(stack, ["--router", "cache-aware"], log_dir, "late-gateway")
    try:
        late.wait_up()
        deadline = time.monotonic() + 15
        while True:
            items = get(late, "/instances").json()["instances"]
            if len(items) == 3 and sum(i["cached_blocks"] for i in items) >= 3 * 6:
                break
            assert time.monotonic() < deadline, items
            time.sleep(0.2)
        late_client = client_for(late)
        assert all(cached_tokens(late_client, system + [9, 9]) >= 96 for system in systems)
    finally:
        late.stop()
