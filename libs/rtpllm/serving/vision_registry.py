"""The vision instances a gateway hears from (their heartbeats), for /metrics and
/instances. Routing does not need them: engines pick a vision instance through the
services' queue group.

Leases are judged as the gateway judges its engines (rtpllm.routing.lease): on the
clock the gateway passes in (its dispatcher's, which stands still while the gateway's
loop is stalled) and stretched to the heartbeat intervals actually observed, so a live
vision instance is not reported gone because its beats, or this process, ran late."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from rtpllm.protocol import subjects
from rtpllm.protocol.messages import ProtocolError, VisionHeartbeat, decode
from rtpllm.routing.lease import PeerLease


class VisionRegistry:
    """Live vision instances by id; one silent past its lease is dropped."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[str, tuple[PeerLease, VisionHeartbeat]] = {}
        self._sub: Subscription | None = None

    async def start(self, nc: NATS) -> None:
        self._sub = await nc.subscribe(subjects.VISION_HEARTBEAT, cb=self._on_heartbeat)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def beat(self, hb: VisionHeartbeat) -> None:
        now = self._clock()
        entry = self._seen.get(hb.instance_id)
        lease = entry[0] if entry is not None else PeerLease(now, hb.lease_s)
        lease.renew(now, hb.lease_s)
        self._seen[hb.instance_id] = (lease, hb)

    def live(self) -> list[VisionHeartbeat]:
        now = self._clock()
        for instance_id, (lease, _) in list(self._seen.items()):
            if now > lease.expires_at:
                del self._seen[instance_id]
        return [hb for _, hb in self._seen.values()]

    async def _on_heartbeat(self, msg: Msg) -> None:
        with contextlib.suppress(ProtocolError):
            self.beat(decode(msg.data, VisionHeartbeat))
