"""Publishing an engine's KV-cache events on NATS (the router's input, issue 6)."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NATS

from rtpllm.kvcache.events import KVEventBatch
from rtpllm.protocol import subjects
from rtpllm.protocol.messages import KVEvents, ProtocolError
from rtpllm.protocol.parts import events_parts

log = logging.getLogger(__name__)


class KVEventPublisher:
    """Callable given to the engine as `on_kv_events`.

    The engine calls it from its own thread after each step, so it only hands the batch
    to the event loop and never blocks the engine.
    """

    def __init__(self, nc: NATS, loop: asyncio.AbstractEventLoop, instance_id: str, model: str) -> None:
        self._nc = nc
        self._loop = loop
        self._subject = subjects.kv_events_subject(instance_id)
        self._instance_id = instance_id
        self._model = model
        self.last_seq = -1  # announced in heartbeats so a router can spot a gap
        self._tasks: set[asyncio.Task[None]] = set()  # the loop only holds tasks weakly
        # Batches go out in order, each one's parts together (a router drops a batch
        # whose parts another batch interrupts); the tasks take it in creation order.
        self._order = asyncio.Lock()

    def set_model(self, model: str) -> None:
        """The served model name is only known once the engine has loaded."""
        self._model = model

    def __call__(self, batch: KVEventBatch) -> None:
        self._loop.call_soon_threadsafe(self._publish, batch)

    def _publish(self, batch: KVEventBatch) -> None:
        self.last_seq = batch.seq
        message = KVEvents(instance_id=self._instance_id, model=self._model, batch=batch)
        try:
            # One step can store or evict more keys than max_payload holds: then parts.
            parts = events_parts(message, self._nc.max_payload)
        except ProtocolError as exc:  # routers see the gap and ask for a snapshot
            log.error("KV events batch %d not published: %s", batch.seq, exc)
            return
        task = self._loop.create_task(self._send(parts))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def _send(self, parts: list[bytes]) -> None:
        async with self._order:
            for data in parts:
                await self._nc.publish(self._subject, data)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not publish KV events: %s", task.exception())
