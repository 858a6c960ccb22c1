"""The engine instances one gateway knows about, each held by a lease (ARCHITECTURE rule 5).

Pure bookkeeping, no I/O: the gateway's dispatcher feeds it heartbeats and leaves from
NATS and asks it which leases ran out.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from rtpllm.protocol.messages import Heartbeat
from rtpllm.protocol.subjects import InstanceRole
from rtpllm.routing.lease import BeatIntervals


@dataclass
class Instance:
    """One live engine instance as this gateway sees it."""

    heartbeat: Heartbeat
    last_seen: float
    # Requests this gateway has running there: exact and current, unlike the heartbeat's
    # load, which is up to one heartbeat interval old and counts every gateway's requests.
    inflight: int = 0
    # NATS said nobody listens on its subject (killed, or draining): skipped by routing
    # until its next heartbeat proves it alive, or its lease expires.
    unreachable: bool = False
    # When its heartbeats arrived: its lease covers the intervals actually observed.
    beats: BeatIntervals = field(default_factory=BeatIntervals)

    @property
    def instance_id(self) -> str:
        return self.heartbeat.instance_id

    @property
    def model(self) -> str:
        return self.heartbeat.model

    @property
    def ready(self) -> bool:
        return self.heartbeat.state == "ready"

    @property
    def lease_s(self) -> float:
        """Its announced lease, stretched to cover the heartbeat intervals we observe
        (rtpllm.routing.lease)."""
        return self.beats.lease_s(self.heartbeat.lease_s)

    @property
    def expires_at(self) -> float:
        return self.last_seen + self.lease_s

    @property
    def pending(self) -> int:
        """Best estimate of the requests queued or running there."""
        load = self.heartbeat.load
        return max(self.inflight, load.num_running + load.num_waiting)


class InstanceRegistry:
    """Instances by id. A heartbeat registers or renews; `expire()` drops those whose
    lease ran out; `remove()` drops one that said goodbye.

    An instance dropped for silence comes back with its next heartbeat: silence may have
    been a stall (its host, the network, or this process), not a death. One that said
    goodbye stays gone: a heartbeat still in flight after its Leave must not resurrect it
    (instance ids are unique per process start, so a restarted process is a new id).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, tombstones: int = 1024) -> None:
        self._clock = clock
        self._instances: dict[str, Instance] = {}
        self._gone: deque[str] = deque(maxlen=tombstones)  # ids that said goodbye
        # Ids dropped for silence, with when: a heartbeat from one is a re-admission.
        self._silenced: dict[str, float] = {}
        self._max_silenced = max(tombstones, 1)

    def upsert(self, heartbeat: Heartbeat) -> tuple[Instance, bool]:
        """Record a heartbeat; returns the instance and whether it is new (or back)."""
        inst = self._instances.get(heartbeat.instance_id)
        now = self._clock()
        if inst is None:
            inst = Instance(heartbeat, now)
            inst.beats.beat(now)
            self._instances[heartbeat.instance_id] = inst
            return inst, True
        inst.heartbeat = heartbeat
        inst.last_seen = max(inst.last_seen, now)
        inst.beats.beat(now)
        inst.unreachable = False
        return inst, False

    def accepts(self, instance_id: str) -> bool:
        """False for an instance that said goodbye (its late heartbeats are ignored)."""
        return instance_id not in self._gone

    def silenced_at(self, instance_id: str) -> float | None:
        """When the instance was last dropped for silence (None if never, or long ago);
        the dispatcher logs a returning instance as re-admitted."""
        return self._silenced.get(instance_id)

    def touch(self, instance_id: str) -> None:
        """Any message from an instance proves it alive, not only heartbeats."""
        inst = self._instances.get(instance_id)
        if inst is not None:
            inst.last_seen = max(inst.last_seen, self._clock())

    def mark_unreachable(self, instance_id: str) -> None:
        inst = self._instances.get(instance_id)
        if inst is not None:
            inst.unreachable = True

    def remove(self, instance_id: str) -> Instance | None:
        """Drop an instance that said goodbye; its late heartbeats are ignored."""
        inst = self._instances.pop(instance_id, None)
        if inst is not None:
            self._gone.append(instance_id)
        return inst

    def expire(self) -> list[Instance]:
        """Drop and return every instance whose lease has run out (not tombstoned: its
        next heartbeat re-admits it)."""
        now = self._clock()
        dead = [inst for inst in self._instances.values() if inst.expires_at < now]
        for inst in dead:
            del self._instances[inst.instance_id]
            self._silenced.pop(inst.instance_id, None)
            self._silenced[inst.instance_id] = now
            if len(self._silenced) > self._max_silenced:  # bounded: forget the oldest
                del self._silenced[next(iter(self._silenced))]
        return dead

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def candidates(
        self, model: str, roles: tuple[InstanceRole, ...] = (InstanceRole.WORKER, InstanceRole.DECODE)
    ) -> list[Instance]:
        """Instances that take new requests for `model` in one of `roles` (by default the
        ones a gateway sends requests to: combined workers and decode instances)."""
        wanted = {role.value for role in roles}
        return [
            inst
            for inst in self._instances.values()
            if inst.ready and not inst.unreachable and inst.model == model and inst.heartbeat.role in wanted
        ]

    def models(self) -> list[str]:
        return sorted({inst.model for inst in self._instances.values()})

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._instances.values()))

    def __len__(self) -> int:
        return len(self._instances)
