"""The gateway's list of vision instances (rtpllm.serving.vision_registry, for /metrics
and /instances): leases on the clock the gateway passes (its dispatcher's stall-aware
one) and stretched to observed heartbeat intervals, as for engine instances."""

from __future__ import annotations

from rtpllm.protocol.messages import VisionHeartbeat
from rtpllm.routing.lease import MAX_STRETCH
from rtpllm.serving.vision_registry import VisionRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def heartbeat(instance_id: str = "vision-0", lease_s: float = 1.0) -> VisionHeartbeat:
    return VisionHeartbeat(instance_id=instance_id, model="m", namespace=b"ns", seq=1, lease_s=lease_s)


def ids(registry: VisionRegistry) -> list[str]:
    return [hb.instance_id for hb in registry.live()]


def test_only_the_given_clock_counts() -> None:
    clock = Clock()
    registry = VisionRegistry(clock)
    registry.beat(heartbeat())
    clock.now += 0.9
    assert ids(registry) == ["vision-0"]
    clock.now += 0.2  # 1.1 s of silence against a 1 s lease
    assert ids(registry) == []


def test_late_beats_stretch_the_lease_and_a_dead_instance_still_goes() -> None:
    clock = Clock()
    registry = VisionRegistry(clock)
    for _ in range(3):  # heartbeats 2.5 s apart against a 1 s lease: a loaded host
        registry.beat(heartbeat())
        clock.now += 2.5
    # 2.5 s since the last beat: past the announced lease, within 3 observed intervals.
    assert ids(registry) == ["vision-0"]
    clock.now = 100 + 5.0 + MAX_STRETCH * 1.0 + 0.1  # silent past the longest stretch
    assert ids(registry) == []


def test_instances_are_judged_apart() -> None:
    clock = Clock()
    registry = VisionRegistry(clock)
    registry.beat(heartbeat("vision-0"))
    registry.beat(heartbeat("vision-1", lease_s=5.0))
    clock.now += 2.0
    assert ids(registry) == ["vision-1"]
