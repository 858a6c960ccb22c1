"""Router policies: which engine instance serves a request.

A policy sees the request (its tokens: cache-aware routing will hash them into block
keys) and the live candidates with their load. Policies are registered by name for the
`--router` flag.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from rtpllm.routing.instances import Instance


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at. Cache-aware routing (issue 6) adds block keys."""

    request_id: str
    model: str
    prompt_token_ids: Sequence[int]


class RouterPolicy(ABC):
    """Chooses one of the candidates for a request.

    Called on the gateway's event loop for every request: it must be cheap and must not
    block. `candidates` is never empty and holds only ready instances of the request's
    model; a policy may keep state (counters, indexes) but must tolerate instances
    appearing and disappearing between calls.
    """

    name: ClassVar[str]

    @abstractmethod
    def choose(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        """The instance to send `request` to."""


class RoundRobin(RouterPolicy):
    """Each request to the next instance in id order, ignoring load (a baseline)."""

    name = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        ordered = sorted(candidates, key=lambda inst: inst.instance_id)
        return ordered[next(self._counter) % len(ordered)]


class LeastLoaded(RouterPolicy):
    """The instance with the fewest pending requests, then the emptiest KV cache; ties are
    broken in rotation so equal instances share a burst."""

    name = "least-loaded"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        ordered = sorted(candidates, key=lambda inst: inst.instance_id)
        start = next(self._counter) % len(ordered)
        rotated = ordered[start:] + ordered[:start]
        # min() keeps the first of equal keys, so the rotation decides ties.
        return min(rotated, key=lambda inst: (inst.pending, round(inst.heartbeat.load.kv_usage, 2)))


POLICIES: dict[str, type[RouterPolicy]] = {cls.name: cls for cls in (LeastLoaded, RoundRobin)}


def make_policy(name: str) -> RouterPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown router policy {name!r}; choose one of {', '.join(POLICIES)}") from None
