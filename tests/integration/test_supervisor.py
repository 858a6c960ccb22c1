"""`rtpllm up`'s supervisor: an engine that dies is restarted, and so is one that stays
alive but unregistered (SIGSTOPped past its lease); the stack serves again after each."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from rtpllm.runtime.supervisor import Supervisor
from tests.integration.support import ask, client_for, running_stack, serving_ids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def tick_until(supervisor: Supervisor, done, timeout: float, what: str) -> None:  # noqa: ANN001 - a test helper
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out: {what}"
        supervisor.tick()
        time.sleep(0.25)


def test_dead_and_unregistered_engines_are_restarted(tiny_model: Path, tmp_path: Path) -> None:
    with running_stack(tiny_model, tmp_path, workers=1) as stack:
        said: list[str] = []
        supervisor = Supervisor(stack, said.append, unregistered_grace_s=2.0)
        client = client_for(stack)
        first = stack.workers[0]
        supervisor.tick()  # it is registered: watched from now on
        first.kill()
        tick_until(supervisor, lambda: supervisor.restarts == 1, 30, "the dead worker replaced")
        assert any("exited" in line for line in said), said
        new = stack.workers[0]
        assert new is not first
        tick_until(supervisor, lambda: stack.instance_ids[new.name] in serving_ids(stack), 60, "the new worker registered")
        assert ask(client, [1, 2, 3, 4])[0]

        new.signal(signal.SIGSTOP)  # alive, silent: the gateway drops it after its lease
        tick_until(supervisor, lambda: supervisor.restarts == 2, 60, "the unregistered worker replaced")
        assert any("not been registered" in line for line in said), said
        assert not new.alive
        newest = stack.workers[0]
        tick_until(supervisor, lambda: stack.instance_ids[newest.name] in serving_ids(stack), 60, "the newest worker registered")
        assert ask(client, [5, 6, 7, 8])[0]
