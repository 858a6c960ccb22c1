"""Schemathesis (a real OpenAPI fuzzer) against the gateway's schema: no generated
request gets a 5xx, and the stack answers normally afterwards. The short CI version of
`bench/api_fuzz.py` (which runs thousands), on the shared integration stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.api_fuzz import fuzz, healthy_after
from rtpllm.runtime.stack import Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_fuzzed_requests_get_no_server_error(stack: Stack, tmp_path: Path) -> None:
    result = fuzz(stack, max_examples=15, workdir=tmp_path, seed=7)
    assert result["requests"] > 200, result["summary"]
    assert result["server_errors"] == 0, (result["statuses"], result["summary"])
    assert result["exit_code"] == 0, result["summary"]
    assert healthy_after(stack)
    assert all(p.alive for p in stack.workers)
