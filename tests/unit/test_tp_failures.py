"""Tensor parallelism when things are not plain: async scheduling (input ids broadcast on
the device group), more ranks than KV heads (replicated KV heads), a rank that dies
(idle, inside a step or during KV transfers: an error within seconds, no process left)
and rank 0 killed (its workers exit). Each test owns its engines: one torch.distributed
group per process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rtpllm import LLM
from rtpllm.engine.tensor_parallel import TensorParallelError
from tests.unit.test_tensor_parallel import ENGINE, GREEDY, live, one_thread_per_rank, prompts_of  # noqa: F401


def test_async_scheduling_and_replicated_kv_heads(tiny_llama: Path) -> None:
    # 4 ranks, 2 KV heads: each KV head on two ranks. Async scheduling: input ids of
    # running requests come from the previous step on rank 0's device, broadcast.
    ref = LLM(str(tiny_llama), **ENGINE)  # type: ignore[arg-type]
    with LLM(str(tiny_llama), tensor_parallel_size=4, async_scheduling=True, **ENGINE) as four:  # type: ignore[arg-type]
        assert four.engine.model.layout.replicated_kv and four.engine.kv_pool.kv.shape[-2] == 1
        prompts = prompts_of(3, 20, seed=4)
        want = [o.outputs[0].token_ids for o in ref.generate(prompts, GREEDY)]
        assert [o.outputs[0].token_ids for o in four.generate(prompts, GREEDY)] == want
        pids = four.engine.tp.workers.pids  # type: ignore[union-attr]
    assert not live(pids)


def test_a_dead_rank_fails_the_engine_with_an_error(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), tensor_parallel_size=2, **ENGINE)  # type: ignore[arg-type]
    tp = llm.engine.tp
    assert tp is not None
    broken: list[str] = []
    tp.on_failure = broken.append
    assert llm.generate([[1, 2, 3]], GREEDY)[0].outputs[0].token_ids
    os.kill(tp.workers.pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not broken and time.monotonic() < deadline:
        time.sleep(0.05)
    assert broken and "rank 1 exited" in broken[0], "rank 0 notices a dead rank while idle"
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 1"):
        llm.generate([[4, 5, 6]], GREEDY)
    assert time.monotonic() - start < 5
    assert not llm.engine.has_unfinished_requests()
    llm.close()
    # The group is gone with it: a new tensor-parallel engine starts in this process.
    with LLM(str(tiny_llama), tensor_parallel_size=2, **ENGINE) as again:  # type: ignore[arg-type]
        assert again.generate([[1, 2, 3]], GREEDY)[0].outputs[0].token_ids


def test_a_rank_that_dies_mid_step_fails_the_step(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), tensor_parallel_size=2, **ENGINE)  # type: ignore[arg-type]
    tp = llm.engine.tp
    assert tp is not None
    worker = tp.workers.pids[0]
    calls = []
    all_reduce = tp.group.all_reduce

    def kill_in_third_layer_call(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:  # inside the first step's forward
            os.kill(worker, signal.SIGKILL)
        return all_reduce(x)

    tp.group.all_reduce = kill_in_third_layer_call  # type: ignore[method-assign]
    start = time.monotonic()
    with pytest.raises(TensorParallelError):
        llm.generate(prompts_of(2, 10, seed=5), GREEDY)
    assert time.monotonic() - start < 5
    llm.close()
    assert not live([worker])


def test_a_rank_killed_during_kv_transfers_fails_them(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), tensor_parallel_size=2, **ENGINE)  # type: ignore[arg-type]
    tp = llm.engine.tp
    assert tp is not None
    worker = tp.workers.pids[0]
    blocks = llm.engine.kv_blocks()  # the PD data plane's view: every rank's heads through rank 0
    ids = np.arange(16)
    buf = blocks.host_buffer(blocks.payload_bytes(len(ids), 0))
    # A rank that cannot read its part (an id past every pool) is an error on rank 0,
    # and the group stays in step.
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[0, 1\] could not read"):
        blocks.gather(0, np.asarray([10_000]), buf)
    assert tp.error is None
    rounds: list[int] = []
    errors: list[BaseException] = []

    def transfers() -> None:
        try:
            while True:
                layer = len(rounds) % 2
                blocks.gather(layer, ids, buf)
                blocks.scatter(layer, ids, buf, None)
                rounds.append(1)
        except BaseException as exc:  # noqa: BLE001 - what the data plane would see
            errors.append(exc)

    thread = threading.Thread(target=transfers, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while len(rounds) < 5 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(rounds) >= 5 and not errors, errors
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(5)
    assert not thread.is_alive(), "a KV transfer hangs on a dead rank"
    assert time.monotonic() - killed < 5
    assert errors and isinstance(errors[0], TensorParallelError), errors
    with pytest.raises(TensorParallelError):  # and every later one fails at once
        blocks.scatter(0, ids, buf, None)
    llm.close()
    assert not live([worker])


def test_workers_exit_when_rank_zero_is_killed(tiny_llama: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from rtpllm import LLM
        llm = LLM({str(tiny_llama)!r}, device="cpu", tensor_parallel_size=2, num_blocks=16)
        print(*llm.engine.tp.workers.pids, flush=True)
        time.sleep(60)
        """
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and live(pids)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while live(pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not live(pids), "a worker outlived rank 0"
    finally:
        proc.kill()


def _my_tp_workers() -> list[int]:
    """Live tensor-parallel workers started by this process."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == me and b"rtpllm.engine.tp_worker" in cmdline:
            found.append(int(entry.name))
    return found


def test_an_engine_that_fails_to_start_ends_its_ranks(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="less than max_model_len"):
        LLM(
            str(tiny_llama),
            device="cpu",
            tensor_parallel_size=2,
            num_blocks=4,
            block_size=8,
            max_model_len=512,
        )
    assert not _my_tp_workers()
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide"):
        LLM(str(tiny_llama), device="cpu", tensor_parallel_size=3)
    with LLM(str(tiny_llama), tensor_parallel_size=2, **ENGINE) as llm:  # type: ignore[arg-type]
        assert llm.generate([[1, 2, 3]], GREEDY)[0].outputs[0].token_ids


def test_speculative_verify_steps_reach_every_rank(tiny_llama: Path) -> None:
    # A verify step carries its row groups (decode_spans) to the other ranks in the
    # step's payload; a misread payload would desynchronise the ranks' batches.
    from rtpllm.config import SpeculativeConfig

    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=3, adaptive=False, ngram_min=1)
    prompts = [[11, 12, 13, 14] * 5, [7] * 12, [40, 41, 42] * 6]
    ref = LLM(str(tiny_llama), **ENGINE)  # type: ignore[arg-type]
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, GREEDY)]
    assert all(len(w) == GREEDY.max_tokens for w in want)
    with LLM(str(tiny_llama), tensor_parallel_size=2, speculative=spec, **ENGINE) as two:  # type: ignore[arg-type]
        assert [o.outputs[0].token_ids for o in two.generate(prompts, GREEDY)] == want
        assert two.engine.stats().spec_proposed_tokens > 0


def test_a_break_after_the_group_is_gone_still_stops_the_workers_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank's exit noticed while the group is being destroyed (close, or the engine's
    finalizer, on another thread): asking the group's backend raises, yet the workers
    are stopped and the owner is told, so no request waits on a dead group (CI saw this
    as an exception in the watcher thread)."""
    from types import SimpleNamespace

    from rtpllm.engine import tensor_parallel

    tp = object.__new__(tensor_parallel.TensorParallel)  # the break path alone, no ranks
    stopped: list[float] = []
    reported: list[str] = []
    tp._lock, tp._closed, tp.error = threading.Lock(), False, None
    tp.workers = SimpleNamespace(stop=lambda grace_s: stopped.append(grace_s))
    tp.group = SimpleNamespace(device_group=object())
    tp.on_failure = reported.append

    def destroyed(group: object) -> str:
        raise ValueError("Process group is not initialized in the world group map")

    monkeypatch.setattr(tensor_parallel.dist, "get_backend", destroyed)
    tp._break("tensor-parallel rank 1 exited with code -9")
    assert stopped == [2.0]
    assert reported == ["tensor-parallel rank 1 exited with code -9"]
    assert tp.error == "tensor-parallel rank 1 exited with code -9"
