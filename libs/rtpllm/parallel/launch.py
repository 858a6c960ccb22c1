"""Starting the other ranks of a tensor-parallel engine on this host, and ending them.

Rank 0 (the engine's own process) hosts the rendezvous: a torch TCPStore on a free
loopback port. Ranks 1..N-1 are child processes (`python -m <module>`) given the
torchrun variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), so the
worker entry point is the one a multi-host launch would run under torchrun.

The children's lives are tied to rank 0 three ways:
- each reads its start-up payload from a pipe on stdin and keeps the pipe open: end of
  file means rank 0 is gone (killed with SIGKILL included) and the worker exits;
- a dead peer ends every wait on the groups at once (gloo sees the socket close);
- rank 0 watches the children: `first_exit` reports one that died, and `stop` ends
  them all (pipe closed, then SIGTERM, then SIGKILL).
They run in their own session, so a terminal's Ctrl-C reaches rank 0 only, which stops
them in order.
"""

from __future__ import annotations

import datetime
import logging
import os
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)

# A worker sets this store key (with its rank) once it is about to join the groups.
JOINED_KEY = "rtpllm/tp/joined/{rank}"
STORE_TIMEOUT = datetime.timedelta(minutes=5)


def rank_device(device: str, rank: int) -> str:
    """The device of `rank`: "cpu" for every rank; "cuda" or "cuda:k" -> cuda:(k + rank)."""
    if not device.startswith("cuda"):
        return device
    base = int(device.split(":", 1)[1]) if ":" in device else 0
    return f"cuda:{base + rank}"


class WorkerProcesses:
    """Ranks 1..size-1 as child processes of this one (rank 0)."""

    def __init__(self, size: int, payload: bytes, module: str, master_addr: str = "127.0.0.1") -> None:
        self.size = size
        self.store = dist.TCPStore(
            master_addr, 0, size, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT
        )
        self.stopping = False
        env = dict(os.environ)
        # The children import rtpllm the way this process does, editable install or not.
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        env.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(self.store.port),
            WORLD_SIZE=str(size),
            LOCAL_WORLD_SIZE=str(size),
        )
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        try:
            for rank in range(1, size):
                proc = subprocess.Popen(
                    [sys.executable, "-m", module],
                    stdin=subprocess.PIPE,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    start_new_session=True,
                )
                self.procs[rank] = proc
                assert proc.stdin is not None
                proc.stdin.write(struct.pack("<Q", len(payload)) + payload)
                proc.stdin.flush()
        except BaseException:
            self.stop(grace_s=0)
            raise
        # Interpreter exit or a forgotten engine still ends the children.
        self._finalizer = weakref.finalize(self, _reap, list(self.procs.values()), 0.0)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def wait_joined(self, timeout_s: float) -> None:
        """Until every worker is about to join the groups; RuntimeError if one exits first
        (a bad config, an import error: its stderr says) or `timeout_s` passes."""
        keys = [JOINED_KEY.format(rank=r) for r in self.procs]
        deadline = time.monotonic() + timeout_s
        while not self.store.check(keys):
            dead = self.first_exit()
            if dead is not None:
                raise RuntimeError(
                    f"tensor-parallel rank {dead[0]} exited with code {dead[1]} while starting"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel ranks did not start within {timeout_s:.0f} s")
            time.sleep(0.02)

    def first_exit(self) -> tuple[int, int] | None:
        """(rank, exit code) of a worker that has exited, if any."""
        for rank, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return rank, code
        return None

    def watch(self, on_exit: Callable[[int, int], None]) -> None:
        """Call `on_exit(rank, code)` from a thread when a worker exits before `stop`."""

        def wait(rank: int, proc: subprocess.Popen[bytes]) -> None:
            code = proc.wait()
            if not self.stopping:
                on_exit(rank, code)

        for rank, proc in self.procs.items():
            threading.Thread(
                target=wait, args=(rank, proc), name=f"rtpllm-tp-watch-{rank}", daemon=True
            ).start()

    def stop(self, grace_s: float = 10.0) -> None:
        """End every worker: close their pipes (a worker waiting for a step exits), wait
        up to `grace_s`, then SIGTERM, then SIGKILL. Returns when all have exited."""
        self.stopping = True
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        _reap(list(self.procs.values()), grace_s)


def _reap(procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    for proc in procs:
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            log.warning("tensor-parallel worker %d did not exit on SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait()
