"""The vision instances a gateway hears from (their heartbeats), for /metrics and
/instances. Routing does not need them: engines pick a vision instance through the
services' queue group."""

from __future__ import annotations

import contextlib
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from rtpllm.protocol import subjects
from rtpllm.protocol.messages import ProtocolError, VisionHeartbeat, decode


class VisionRegistry:
    """Live vision instances by id; one silent for its lease is dropped."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, VisionHeartbeat]] = {}
        self._sub: Subscription | None = None

    async def start(self, nc: NATS) -> None:
        self._sub = await nc.subscribe(subjects.VISION_HEARTBEAT, cb=self._on_heartbeat)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def beat(self, hb: VisionHeartbeat) -> None:
        self._seen[hb.instance_id] = (time.monotonic(), hb)

    def live(self) -> list[VisionHeartbeat]:
        now = time.monotonic()
        for instance_id, (seen, hb) in list(self._seen.items()):
            if now - seen > hb.lease_s:
                del self._seen[instance_id]
        return [hb for _, hb in self._seen.values()]

    async def _on_heartbeat(self, msg: Msg) -> None:
        with contextlib.suppress(ProtocolError):
            self.beat(decode(msg.data, VisionHeartbeat))
