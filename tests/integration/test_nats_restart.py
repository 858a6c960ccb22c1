"""nats-server restarts under load: the stack recovers by itself (clients reconnect,
instances re-register), every request in flight ends (answered or a clear error, never
hung), and new requests succeed again. Real processes; the recovery time is printed."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest

from rtpllm.runtime.processes import start_nats, wait_until
from tests.integration.support import MODEL_NAME, client_for, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

REQUEST_LIMIT_S = 30.0  # a request that takes longer than this counts as hung


def test_nats_restart_under_load(tiny_model: Path, tmp_path: Path) -> None:
    with running_stack(tiny_model, tmp_path, workers=2) as stack:
        client = client_for(stack)
        client = client.with_options(timeout=REQUEST_LIMIT_S + 30)
        outcomes: list[tuple[float, float, str]] = []  # (start, end, "ok" | error code)
        stop = threading.Event()

        def load(seed: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                start = time.monotonic()
                try:
                    stream = client.completions.create(
                        model=MODEL_NAME, prompt=[(seed * 31 + i * 7 + j) % 300 for j in range(40)],
                        max_tokens=24, temperature=0, stream=True, extra_body={"ignore_eos": True},
                    )  # fmt: skip
                    finish = None
                    for chunk in stream:
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finish = chunk.choices[0].finish_reason
                    outcome = "ok" if finish else "no finish_reason"
                except openai.APIStatusError as exc:
                    outcome = f"{exc.status_code}"
                except openai.APIError as exc:  # an error event in the stream
                    outcome = f"stream error: {exc.message[:60]}"
                outcomes.append((start, time.monotonic(), outcome))
                if outcome != "ok":
                    time.sleep(0.2)

        threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        # Traffic flows before the restart: the first completions (a loaded 2-core
        # machine may take several seconds for them), then a little more load.
        wait_until(lambda: any(o == "ok" for _, _, o in outcomes), 30, "a first completed request")
        time.sleep(1.0)
        port = urlparse(stack.nats_url).port
        assert stack.nats is not None
        stack.nats.kill()
        stack.nats.wait(5)
        time.sleep(1.0)
        stack.nats, _ = start_nats(port, token=stack.nats_token, log_path=tmp_path / "nats-restarted.log")
        restarted = time.monotonic()
        deadline = restarted + 30
        while not any(o == "ok" and s > restarted for s, _, o in outcomes):
            assert time.monotonic() < deadline, "no request succeeded within 30 s of the restart"
            time.sleep(0.1)
        recovery_s = min(e for s, e, o in outcomes if o == "ok" and s > restarted) - restarted
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(REQUEST_LIMIT_S + 35)
        assert not any(t.is_alive() for t in threads), "a request hung"
        slow = [(round(e - s, 1), o) for s, e, o in outcomes if e - s > REQUEST_LIMIT_S]
        assert not slow, f"requests that took longer than {REQUEST_LIMIT_S} s: {slow}"
        unclear = [o for _, _, o in outcomes if o == "no finish_reason"]
        assert not unclear, unclear
        errors = sorted({o for _, _, o in outcomes if o != "ok"})
        print(f"\nNATS restart: first success {recovery_s:.2f} s after the new server started; "
              f"{len(outcomes)} requests, {sum(o == 'ok' for _, _, o in outcomes)} ok, errors {errors}")  # fmt: skip
        assert recovery_s < 15.0
