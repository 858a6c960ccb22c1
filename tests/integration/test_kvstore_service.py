"""The kvstore service with real processes: two workers share one host's kvstore (host-
memory tier only). A prefix computed by one worker is a hit on the other through the
kvstore, a restarted worker hits it again, and with the kvstore killed requests still
succeed (as misses)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtpllm.protocol import subjects
from rtpllm.protocol.messages import KVStoreHeartbeat, KVStorePing, decode, encode
from rtpllm.runtime.stack import Stack
from rtpllm.serving.bus import connect_nats
from tests.integration.support import ask, client_for, get, restart_one_worker, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# Write-through is on with a kvstore (auto): every computed block reaches it at once.
WORKER_ARGS = ["--kvstore", "--block-size", "16"]
PROMPT = [(29 * i + 7) % 300 for i in range(160)]  # 10 full blocks


@pytest.fixture(scope="module")
def shared(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("kvstore-logs")
    with running_stack(
        tiny_model, log_dir, workers=2, worker_args=WORKER_ARGS, gateway_args=["--router", "round-robin"],
        use_redis=False, kvstore=True, kvstore_args=["--kv-host-gib", "0.05"],
    ) as stack:  # fmt: skip
        yield stack


def kvstore_beat(stack: Stack) -> KVStoreHeartbeat:
    async def ping() -> KVStoreHeartbeat:
        nc = await connect_nats(stack.nats_url, "test-ping", 5)
        try:
            subject = subjects.kvstore_subject(subjects.default_host_id(), subjects.KVStoreOp.PING)
            msg = await nc.request(subject, encode(KVStorePing()), timeout=2)
            return decode(msg.data, KVStoreHeartbeat)
        finally:
            await nc.close()

    return asyncio.run(ping())


def wait_blocks(stack: Stack, n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while kvstore_beat(stack).host_blocks < n:
        assert time.monotonic() < deadline, f"the kvstore never held {n} blocks"
        time.sleep(0.05)


def test_prefix_moves_between_workers_through_the_kvstore(shared: Stack) -> None:
    client = client_for(shared)
    _, cached = ask(client, PROMPT + [1])  # worker A computes it (round-robin: A, B, A, ...)
    assert cached == 0
    wait_blocks(shared, 10)  # written through by A (puts complete in the background)
    _, cached_b = ask(client, PROMPT + [2])  # worker B has never seen it
    assert cached_b == 160, "B restored all 10 blocks from the kvstore's host memory"
    beat = kvstore_beat(shared)
    assert beat.counters.blocks_sent >= 10 and beat.tiers == ["host"]
    assert 'tier="host"' in get(shared, "/metrics").text

    # Restart B (a new process, empty pool): the kvstore still has the prefix.
    restart_one_worker(shared)
    hits = [ask(client, PROMPT + [3 + i])[1] for i in range(2)]  # one lands on the new worker
    assert min(hits) == 160, hits


def test_killed_kvstore_degrades_to_misses(shared: Stack) -> None:
    client = client_for(shared)
    assert shared.kvstore is not None
    shared.kvstore.kill()
    shared.kvstore.wait(5)
    shared.kvstore = None  # killed on purpose
    fresh = [(31 * i + 5) % 300 for i in range(96)]
    started = time.monotonic()
    results = [ask(client, fresh + [i]) for i in range(4)]
    assert all(text for text, _ in results), "requests succeed without the kvstore"
    assert results[0][1] == 0 and results[1][1] == 0, "nothing to restore from"
    assert time.monotonic() - started < 10, "a dead kvstore costs no waiting"
