"""Prefill/decode disaggregation between tensor-parallel instances, with real processes:
NATS, a gateway, a prefill and a decode instance of two ranks each (CPU, gloo).

- Greedy outputs through the openai client equal one TP=1 engine's; the decode
  instance's counters show the long prompts' KV came from the prefill instance (no
  fallback), whole blocks of every KV head (both ranks' halves).
- A TP=1 prefill instance in place of the TP=2 one: its KV namespace (which names the
  TP size) differs, so the TP=2 decode instance never asks it and prefills locally,
  with the same outputs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtpllm.runtime.stack import Stack
from tests.integration.support import client_for, get, running_stack
from tests.integration.test_disaggregation import complete, instances, reference, wait_no_leaks
from tests.integration.test_tensor_parallel_up import _tp_workers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ENGINE_ARGS = ["--max-num-batched-tokens", "48", "--block-size", "16", "--device", "cpu"]
THRESHOLD = 40
LONG = [41, 100, 150]  # remote prefills (>= THRESHOLD uncached tokens)
SHORT = [12]  # prefilled by the decode instance itself
# The tiny Llama's KV: 2 layers x (K, V) x 16 tokens x 2 KV heads x head_dim 16 x fp32.
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4
MAX_TOKENS = 12


def prompts(seed: int) -> list[list[int]]:
    return [[(seed * 31 + 7 * i + n) % 300 + 3 for i in range(n)] for n in LONG + SHORT]


def roles(stack: Stack) -> tuple[dict, dict | None]:
    """(the decode instance, the prefill instance or None) as the gateway lists them."""
    items = instances(stack)
    decode = next(i for i in items.values() if i["role"] == "decode")
    prefill = next((i for i in items.values() if i["role"] == "prefill"), None)
    return decode, prefill


@pytest.fixture(scope="module")
def tp_pd(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("tp-pd-logs")
    with running_stack(
        tiny_model, log_dir, workers=0, worker_args=ENGINE_ARGS + ["-tp", "2"], prefill=1, decode=1,
        decode_args=["--local-prefill-below", str(THRESHOLD)], use_redis=False,
    ) as stack:  # fmt: skip
        yield stack


def test_tp2_prefill_to_tp2_decode_equals_tp1(tp_pd: Stack, tiny_model: Path) -> None:
    for proc in tp_pd.workers:  # a prefill and a decode instance, each of two ranks
        assert len(_tp_workers(proc.pid)) == 1, proc.name
    batch = prompts(seed=1)
    want = reference(tiny_model, batch, MAX_TOKENS)
    client = client_for(tp_pd)
    for prompt, text in zip(batch, want, strict=True):
        resp = complete(client, prompt, MAX_TOKENS)
        assert resp.choices[0].text == text, f"prompt of {len(prompt)} tokens"

    wait_no_leaks(tp_pd)
    decode, prefill = roles(tp_pd)
    assert prefill is not None
    d = decode["disaggregation"]
    assert d["remote_prefills"] == len(LONG) and d["local_prefills"] == len(SHORT) and d["remote_fallbacks"] == 0, d
    ((backend, received),) = d["transfers"].items()
    assert backend in ("shm", "tcp") and received["transfers"] == len(LONG) and received["failures"] == 0
    # Whole blocks: every KV head of the model, rank 1's half included.
    assert received["bytes"] == sum(-(-n // 16) for n in LONG) * BLOCK_BYTES
    assert prefill["disaggregation"]["transfers"][backend]["transfers"] == len(LONG)
    metrics = get(tp_pd, "/metrics").text
    assert f'rtpllm_kv_transfers_total{{backend="{backend}",instance="{decode["instance_id"]}"}} {len(LONG)}' in metrics


def test_tp2_decode_with_a_tp1_prefill_prefills_locally(tp_pd: Stack, tiny_model: Path) -> None:
    old = next(p for p in tp_pd.workers if p.name.startswith("prefill"))
    old.stop(15)
    tp_pd.workers.remove(old)  # stopped on purpose
    new = tp_pd.add_worker(["-tp", "1"], role="prefill")
    new_id = tp_pd.instance_ids[new.name]
    # The decode instance hears the TP=1 instance's heartbeats and turns it down.
    decode_name = next(p.name for p in tp_pd.workers if p.name.startswith("decode"))
    decode_log = Path(tp_pd.config.log_dir) / f"{decode_name}.log"  # type: ignore[arg-type]
    deadline = time.monotonic() + 90
    while f"prefill instance {new_id} is not used" not in decode_log.read_text(errors="replace"):
        assert new.alive, "the TP=1 prefill instance exited"
        assert time.monotonic() < deadline, "the decode instance never heard of the TP=1 prefill instance"
        time.sleep(0.2)
    assert not _tp_workers(new.pid), "the new prefill instance is meant to be TP=1"
    before = roles(tp_pd)[0]["disaggregation"]

    batch = prompts(seed=2)
    want = reference(tiny_model, batch, MAX_TOKENS)
    client = client_for(tp_pd)
    for prompt, text in zip(batch, want, strict=True):
        assert complete(client, prompt, MAX_TOKENS).choices[0].text == text, f"prompt of {len(prompt)} tokens"

    items = wait_no_leaks(tp_pd)
    decode, prefill = roles(tp_pd)[0], items[new_id]
    d = decode["disaggregation"]
    assert d["local_prefills"] - before["local_prefills"] == len(batch), d
    assert d["remote_prefills"] == before["remote_prefills"] and d["remote_fallbacks"] == 0, d
    assert prefill["disaggregation"]["transfers"] == {}, "the TP=1 prefill instance was asked anyway"
