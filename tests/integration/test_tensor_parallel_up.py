"""`rtpllm up --workers 1 -tp 2` on the CPU, the real CLI as a user starts it:

- without the kvstore: one instance of two ranks behind the gateway answers the openai
  client with TP=1's greedy text; killing rank 1 mid-stream ends the stream within
  seconds, leaves no process of that instance behind, and `up` brings a fresh instance
  back;
- with the kvstore (up's default): the same text, and a prefix evicted from the
  instance's small pool is restored from the kvstore (whole blocks, every rank's KV
  heads through rank 0): a cached-token hit whose tier, in the worker's counters, is
  the kvstore's host memory.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from rtpllm import LLM, SamplingParams
from rtpllm.credentials import read_secret_file
from rtpllm.runtime.processes import free_port
from tests.integration.support import (
    MODEL_NAME,
    Endpoint,
    ask,
    client_for,
    dump_logs,
    get,
    stop_up,
    wait_until_ready,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMPT = [(29 * i + 7) % 300 for i in range(40)]


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        out += kids
        frontier += kids
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _tp_workers(up_pid: int) -> list[int]:
    return [p for p in _children(up_pid) if "rtpllm.engine.tp_worker" in _cmdline(p)]


def _instances(gateway: Endpoint) -> list[dict]:
    return get(gateway, "/instances").json()["instances"]


@contextmanager
def _up(tiny_model: Path, tmp_path: Path, args: list[str]) -> Iterator[tuple[subprocess.Popen[str], Endpoint]]:
    """`rtpllm up --workers 1 -tp 2 ... *args` until its gateway is ready: (up, gateway).
    Stopped with SIGINT at the end; on a failure the logs are printed."""
    port = free_port()
    argv = [
        sys.executable, "-m", "rtpllm.cli", "up", "--model", str(tiny_model), "--port", str(port),
        "--workers", "1", "-tp", "2", "--device", "cpu", "--no-redis-server", "--log-dir", str(tmp_path), *args,
    ]  # fmt: skip
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("RTPLLM_API_KEY", "RTPLLM_API_KEY_FILE")}
    env["RTPLLM_CACHE_DIR"] = str(cache)
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output = wait_until_ready(up)
        assert "ready: 1 worker(s)" in output, output
        yield up, Endpoint(f"http://127.0.0.1:{port}", read_secret_file(cache / "api_key"))
    except BaseException:
        dump_logs(tmp_path)
        raise
    finally:
        stop_up(up)
    assert not _tp_workers(up.pid)


def test_up_serves_one_tp2_instance_and_survives_a_dead_rank(tiny_model: Path, tmp_path: Path) -> None:
    want = LLM(str(tiny_model), device="cpu").generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    with _up(tiny_model, tmp_path, ["--no-kvstore", "--num-blocks", "256"]) as (up, gateway):
        [instance] = _instances(gateway)  # two ranks, one instance on the bus
        client = client_for(gateway)
        text, _ = ask(client, PROMPT)
        assert text == want.outputs[0].text

        [rank1] = _tp_workers(up.pid)
        rank0 = next(p for p in _children(up.pid) if rank1 in _children(p))
        stream = client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=900, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        next(chunks)
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        finish = None
        try:
            for chunk in chunks:
                finish = chunk.choices[0].finish_reason if chunk.choices else finish
        except openai.APIError:
            finish = "error"
        assert time.monotonic() - killed < 5, "the stream outlived its dead rank by 5 s"
        assert finish != "length", "900 tokens cannot have finished right after the kill"
        # The old instance's processes are gone; `up` restarts the instance.
        deadline = time.monotonic() + 10
        while (_cmdline(rank0) or _cmdline(rank1)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _cmdline(rank0) and not _cmdline(rank1), "a process of the dead instance is left"
        deadline = time.monotonic() + 90
        while [i["instance_id"] for i in _instances(gateway)] in ([], [instance["instance_id"]]):
            assert time.monotonic() < deadline, "up did not bring the instance back"
            time.sleep(0.5)
        assert ask(client, PROMPT)[0] == text
        assert len(_tp_workers(up.pid)) == 1


# 10 full blocks of 16, then three other 10-block prompts: a pool of 24 blocks keeps 2 of
# the 4 prompts' blocks at most, so the first prompt's are evicted.
PREFIX = [(17 * i + 3) % 300 for i in range(160)] + [1]
OTHERS = [[(31 * i + 11 * j) % 300 for i in range(160)] + [2] for j in range(1, 4)]


def _tier_hit_tokens(gateway: Endpoint, tier: str) -> float:
    """The instances' prompt tokens served from KV tier `tier`, summed (gateway metrics
    from the workers' heartbeats)."""
    metrics = get(gateway, "/metrics").text
    pattern = rf'^rtpllm_kv_tier_hit_tokens(?:_total)?{{[^}}]*tier="{tier}"[^}}]*}} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pattern, metrics, re.M))


def test_up_tp2_with_the_kvstore_restores_an_evicted_prefix(tiny_model: Path, tmp_path: Path) -> None:
    want = LLM(str(tiny_model), device="cpu").generate([PREFIX], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    # A request may wait up to 5 s for its restore (the VM is shared; recomputing 160
    # tokens of the tiny model is predicted to take milliseconds).
    args = ["--num-blocks", "24", "--block-size", "16", "--kv-tier-wait-min", "5", "--kv-tier-wait-max", "5"]
    with _up(tiny_model, tmp_path, args) as (up, gateway):
        assert len(_tp_workers(up.pid)) == 1
        client = client_for(gateway)
        text, cached = ask(client, PREFIX)
        assert (text, cached) == (want.outputs[0].text, 0)
        for other in OTHERS:
            ask(client, other)
        hits_before = _tier_hit_tokens(gateway, "host")
        text, cached = ask(client, PREFIX)
        assert text == want.outputs[0].text
        assert cached == 160, "the evicted prefix's 10 blocks came back from the kvstore"
        deadline = time.monotonic() + 10  # the heartbeat carries the counters (every second)
        while _tier_hit_tokens(gateway, "host") < hits_before + 160:
            assert time.monotonic() < deadline, "the worker's counters show no kvstore (host tier) hit"
            time.sleep(0.2)
