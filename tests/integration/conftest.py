"""Stacks of real processes for the integration tests: nats-server, redis-server, workers
and the gateway on free loopback ports, serving a tiny random-weight Llama.

Startup is the expensive part (each worker imports torch), so the main stack is shared
by the whole session; tests that kill processes start their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.runtime.stack import Stack
from rtpllm.tokenizer import Tokenizer
from tests.integration.support import (
    MODEL_NAME,
    client_for,
    dump_logs,
    http_client,
    running_stacks_logs,
    start_stack,
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the logs of the stacks still running: module and
    session fixtures outlive the test, so their own dump-on-error never sees it fail."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" and report.failed:
        for log_dir, tails in running_stacks_logs():
            report.sections.append((f"logs of the stack in {log_dir}", tails))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("model") / MODEL_NAME, "llama")


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model)


@pytest.fixture(scope="session")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The shared stack: 2 workers behind one gateway."""
    log_dir = tmp_path_factory.mktemp("stack-logs")
    s = start_stack(tiny_model, log_dir, workers=2)
    yield s
    s.stop()
    codes = {p.name: p.returncode for p in s.workers}
    if any(code not in (0, None) for code in codes.values()):
        print(f"worker exit codes: {codes}")
        dump_logs(log_dir)


@pytest.fixture(scope="session")
def client(stack: Stack) -> openai.OpenAI:
    # max_retries=0: the tests check exact status codes, which the client would retry.
    return client_for(stack)


@pytest.fixture(scope="session")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with http_client(stack, timeout=60) as c:  # with the stack's API key
        yield c
