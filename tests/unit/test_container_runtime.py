"""What containers rely on: one GPU claimed per engine process, the health file behind
`rtpllm health`, the data plane announcing a reachable address, and `rtpllm up`'s choice
of topology."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import time
from pathlib import Path

import pytest

from rtpllm.cli.up import choose_topology
from rtpllm.runtime.gpu_claim import NoFreeGPU, claim_gpu
from rtpllm.serving import health
from rtpllm.transfer.endpoint import advertised_address


def _claim_in_child(claim_dir: str, count: int, out: multiprocessing.Queue) -> None:
    try:
        out.put((os.getpid(), claim_gpu(claim_dir, count)))
    except NoFreeGPU:
        out.put((os.getpid(), None))
    time.sleep(60)  # holds its claim until the test kills it


def test_each_process_claims_its_own_gpu_and_a_dead_one_frees_it(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    children = [ctx.Process(target=_claim_in_child, args=(str(tmp_path), 2, out)) for _ in range(3)]
    for child in children:
        child.start()
    claims = dict(out.get(timeout=30) for _ in children)
    assert sorted(claims.values(), key=lambda c: (c is None, c)) == [0, 1, None]  # the third finds none free
    with pytest.raises(NoFreeGPU, match="all 2 GPU"):
        claim_gpu(tmp_path, 2)
    holder = next(pid for pid, gpu in claims.items() if gpu == 1)
    os.kill(holder, 9)  # a crashed replica: the kernel drops its lock
    next(c for c in children if c.pid == holder).join(10)
    assert claim_gpu(tmp_path, 2) == 1
    for child in children:
        child.kill()
        child.join(10)


def test_claim_without_gpus_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoFreeGPU, match="no CUDA device"):
        claim_gpu(tmp_path, 0)


def test_health_file_fresh_then_gone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sub" / "health"
    state = {"healthy": False}

    async def run() -> None:
        task = asyncio.create_task(health.keep_fresh(path, lambda: state["healthy"], 0.01))
        await asyncio.sleep(0.05)
        assert not path.exists()  # not serving yet: never touched
        state["healthy"] = True
        await asyncio.sleep(0.05)
        assert health.main(str(path), 5.0) == 0
        os.utime(path, (0, 0))  # a file last touched long ago ...
        assert health.main(str(path), 5.0) == 1  # ... is stale (a wedged loop stops touching it)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert not path.exists()  # a stopped service never looks healthy
    assert health.main(str(path)) == 1
    assert "does not exist" in capsys.readouterr().out


def test_wildcard_listener_announces_an_address_peers_can_dial() -> None:
    assert advertised_address("10.1.2.3") == "10.1.2.3"
    announced = advertised_address("0.0.0.0")
    assert announced not in ("", "0.0.0.0")
    socket.getaddrinfo(announced, None)  # resolvable (an IP, or at least this host's name)


@pytest.mark.parametrize(
    ("workers", "prefill", "decode", "expected"),
    [(0, None, None, (0, 1, 1)), (2, None, None, (2, 0, 0)), (0, 2, 3, (0, 2, 3)), (0, 0, 2, (0, 0, 2))],
)
def test_up_topology(workers: int, prefill: int | None, decode: int | None, expected: tuple[int, int, int]) -> None:
    assert choose_topology(workers, prefill, decode) == expected


@pytest.mark.parametrize(("workers", "prefill", "decode"), [(2, 1, None), (0, 1, 0), (-1, None, None)])
def test_up_topology_refuses_contradictions(workers: int, prefill: int | None, decode: int | None) -> None:
    with pytest.raises(ValueError):
        choose_topology(workers, prefill, decode)
