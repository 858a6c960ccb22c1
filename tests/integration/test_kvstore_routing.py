"""Cache-aware routing credits a host's kvstore: the kvstore publishes the KV events of
its host tier, engines name their kvstore in heartbeats, and a prefix that only the
kvstore holds (its workers restarted with empty pools) still routes as a cache hit and
is restored rather than recomputed. Real NATS, kvstore, gateway and worker processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rtpllm.runtime.stack import Stack
from tests.integration.support import ask, client_for, get, restart_one_worker, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

PROMPT = [(37 * i + 11) % 300 for i in range(160)]  # 10 full blocks of 16


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("kvstore-routing-logs")
    with running_stack(
        tiny_model, log_dir, workers=2, worker_args=["--kvstore", "--block-size", "16"],
        gateway_args=["--router", "cache-aware"], use_redis=False, kvstore=True, kvstore_args=["--kv-host-gib", "0.05"],
    ) as s:  # fmt: skip
        yield s


def instances(stack: Stack) -> list[dict[str, Any]]:
    return get(stack, "/instances").json()["instances"]


def cache_decisions(stack: Stack) -> float:
    for line in get(stack, "/metrics").text.splitlines():
        if line.startswith('rtpllm_routing_decisions_total{policy="cache-aware",reason="cache"}'):
            return float(line.split()[-1])
    return 0.0


def wait_for(what: str, ok: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_prefix_only_the_kvstore_holds_routes_as_a_hit(stack: Stack) -> None:
    client = client_for(stack)
    assert ask(client, PROMPT + [1])[1] == 0  # computed here, written through to the kvstore
    wait_for(
        "the gateway learns the kvstore's blocks from its KV events",
        lambda: all(i["kvstore_host"] and i["kvstore_cached_blocks"] >= 10 for i in instances(stack)),
    )
    # Fresh processes, empty pools: only the kvstore holds the prefix now.
    restart_one_worker(stack)
    restart_one_worker(stack)
    fresh = instances(stack)
    assert all(i["cached_blocks"] == 0 and i["kvstore_cached_blocks"] >= 10 for i in fresh), fresh
    before = cache_decisions(stack)
    _, cached = ask(client, PROMPT + [2])
    assert cached == 160, "restored from the kvstore, not recomputed"
    assert cache_decisions(stack) == before + 1, "routed for the kvstore's blocks, not by load"
