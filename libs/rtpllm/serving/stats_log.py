"""The gateway's periodic stats line, like vLLM's "Avg prompt throughput ..." line:

    rtpllm.stats: prompt 812.4 tok/s, generation 1530.2 tok/s; gateway: 12 running,
        0 waiting; worker-a: 6 running, 0 waiting, KV 41.2%; worker-b: ...

(on one line) every `--stats-interval` seconds while there is traffic, and once more
when it stops (so the last line shows the drop to zero); nothing while idle.
Throughputs are tokens this gateway's requests took in and got out over the interval
(prompt tokens count when their request ends); running/waiting are sequences, at the
gateway's admission and in each engine instance (from its last heartbeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from rtpllm.routing.instances import InstanceRegistry
from rtpllm.serving.admission import AdmissionController
from rtpllm.serving.metrics import GatewayMetrics

log = logging.getLogger("rtpllm.stats")


class StatsLogger:
    def __init__(
        self,
        metrics: GatewayMetrics,
        admission: AdmissionController,
        instances: InstanceRegistry,
        interval_s: float,
        model: str = "",
    ) -> None:
        self._metrics = metrics
        self._admission = admission
        self._instances = instances
        self.interval_s = interval_s
        self._model = model
        self._last = (time.monotonic(), metrics.prompt_tokens.total, metrics.generation_tokens.total)
        self._was_busy = False
        self._task: asyncio.Task[None] | None = None

    def line(self, now: float | None = None) -> str | None:
        """The line for the interval since the last call, or None when it saw no traffic
        and neither did the one before."""
        now = time.monotonic() if now is None else now
        prompt, generation = self._metrics.prompt_tokens.total, self._metrics.generation_tokens.total
        then, prompt_before, generation_before = self._last
        self._last = (now, prompt, generation)
        elapsed = max(now - then, 1e-9)
        instances = [
            i.heartbeat for i in self._instances if not self._model or i.heartbeat.model == self._model
        ]
        busy = (
            prompt > prompt_before
            or generation > generation_before
            or self._admission.running > 0
            or self._admission.queued > 0
            or any(hb.load.num_running or hb.load.num_waiting for hb in instances)
        )
        if not busy and not self._was_busy:
            return None
        self._was_busy = busy
        parts = [
            f"prompt {(prompt - prompt_before) / elapsed:.1f} tok/s, generation {(generation - generation_before) / elapsed:.1f} tok/s",
            f"gateway: {self._admission.running} running, {self._admission.queued} waiting",
        ]
        for hb in sorted(instances, key=lambda h: h.instance_id):
            parts.append(
                f"{hb.instance_id}: {hb.load.num_running} running, {hb.load.num_waiting} waiting, KV {hb.load.kv_usage * 100:.1f}%"
            )
        return "; ".join(parts)

    def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                text = self.line()
            except Exception:  # a stats line must never take the gateway down
                log.exception("stats line failed")
                continue
            if text is not None:
                log.info("%s", text)
