"""An engine's view of its vision instances' leases (rtpllm.serving.vision_client): on the
engine server's stall-aware clock, stretched to the heartbeat intervals it observes, as
the gateway and the decode side judge engine instances (rtpllm.routing.lease)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from rtpllm.protocol.messages import VisionHeartbeat, encode
from rtpllm.serving.vision_client import VisionClient

NAMESPACE = b"ns"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def client(clock: Clock) -> VisionClient:
    pool = SimpleNamespace(layout=SimpleNamespace(namespace=NAMESPACE))
    return VisionClient(None, "engine-0", pool, None, clock=clock)  # type: ignore[arg-type]


def beat(c: VisionClient, lease_s: float = 1.0, state: str = "ready") -> None:
    hb = VisionHeartbeat(instance_id="vision-0", model="m", namespace=NAMESPACE, seq=1, lease_s=lease_s, state=state)
    asyncio.run(c._on_heartbeat(SimpleNamespace(data=encode(hb))))  # type: ignore[arg-type]


def test_a_vision_instance_lives_for_its_announced_lease_on_the_clock_it_is_given() -> None:
    """The worker gives the engine server's LoopWatch clock, which stands still while the
    loop is stalled: only the given clock's time counts (a fake one here)."""
    clock = Clock()
    c = client(clock)
    assert not c.available()
    beat(c)
    clock.now += 0.9
    assert c.available() and c._alive("vision-0")
    clock.now += 0.2
    assert not c.available() and not c._alive("vision-0")


def test_late_heartbeats_stretch_the_lease_instead_of_flapping() -> None:
    """A loaded host beats every 2 s against an announced 1 s lease: three observed
    intervals (6 s) are its lease, and it stays available between beats."""
    clock = Clock()
    c = client(clock)
    for _ in range(3):
        beat(c)
        clock.now += 2.0
    beat(c)
    clock.now += 5.5
    assert c.available()
    clock.now += 1.0
    assert not c.available()


def test_a_draining_instance_is_not_available_but_still_alive() -> None:
    clock = Clock()
    c = client(clock)
    beat(c, state="draining")
    assert not c.available() and c._alive("vision-0")
