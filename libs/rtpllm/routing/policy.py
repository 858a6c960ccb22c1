"""Router policies: which engine instance serves a request.

A policy sees the request (its tokens, which cache-aware routing hashes into block keys)
and the live candidates with their load. Policies are registered by name for the
`--router` flag.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from rtpllm.kvcache.block_hash import block_keys, image_extras
from rtpllm.protocol.messages import ImageSpec
from rtpllm.protocol.subjects import kvstore_events_id
from rtpllm.routing.instances import Instance
from rtpllm.routing.prefix_index import PrefixIndex


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at. `image_spans`: (content hash, first placeholder offset,
    one past the last) per image of the prompt, in order (`image_spans(images)`), so its
    block keys carry the images exactly as the engine's do (MultimodalInputs.block_extras):
    two images behind the same placeholder tokens never look like one cached prefix."""

    request_id: str
    model: str
    prompt_token_ids: Sequence[int]
    image_spans: tuple[tuple[str, int, int], ...] = ()

    def block_keys(self, block_size: int, namespace: bytes) -> list[bytes]:
        """The prompt's block keys under one KV layout, images included."""
        extras = self._block_extras if self.image_spans else None
        return block_keys(self.prompt_token_ids, block_size, namespace, extras)

    def _block_extras(self, start: int, end: int) -> bytes:
        return image_extras(self.image_spans, start, end)


def image_spans(images: Sequence[ImageSpec]) -> tuple[tuple[str, int, int], ...]:
    """(content hash, first placeholder offset, end of the last run) of each image."""
    return tuple(
        (image.content_hash, image.runs[0][0], image.runs[-1][0] + image.runs[-1][1]) for image in images
    )


class RouterPolicy(ABC):
    """Chooses one of the candidates for a request.

    Called on the gateway's event loop for every request: it must be cheap and must not
    block. `candidates` is never empty and holds only ready instances of the request's
    model; a policy may keep state (counters, indexes) but must tolerate instances
    appearing and disappearing between calls.
    """

    name: ClassVar[str]
    # Why the last choice was made ("load", "cache", "skew"): a metrics label.
    last_reason: str = "load"

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


class CacheAware(RouterPolicy):
    """The instance with the lowest predicted time to first token, in prompt-token units:
    the prompt tokens it would have to prefill (those past the longest chain of the
    prompt's block keys it holds, by its KV events or this gateway's recent choices)
    plus `queue_tokens` per request already pending there. Most pending requests are
    decoding, which delays a new prefill by about one decode step, so the charge is
    small (128 by default): with 512, one extra running request outweighed a turn's
    cached history and split conversations across instances (bench/prefix_routing.py).

    Blocks the instance holds in its host-memory tier (its own, or its host's kvstore
    service's), after those in its pool, count `host_credit` of a block each: the engine restores them instead of recomputing, which
    saves that share of their prefill (about 0.3 for Llama-3.1-8B on an H100, where a
    4K prompt took 74 ms from host memory against 105 ms recomputed; more on CPUs, where
    compute is slow next to a memcpy; bench/kv_tiers.py --ttft).

    When load is skewed (the best-scored instance has more than twice the pending
    requests of the least-loaded one, plus `skew_slack`) the least-loaded one is taken
    instead, so one hot prefix cannot pile everything onto one instance.
    """

    name = "cache-aware"

    def __init__(
        self, index: PrefixIndex | None = None, queue_tokens: int = 128, skew_slack: int = 4, host_credit: float = 0.5
    ) -> None:
        if not 0.0 <= host_credit <= 1.0:
            raise ValueError(f"host_credit must be within [0, 1], got {host_credit}")
        self.index = index if index is not None else PrefixIndex()
        self.queue_tokens = queue_tokens
        self.skew_slack = skew_slack
        self.host_credit = host_credit
        self._fallback = LeastLoaded()

    def choose(self, request: RouteRequest, candidates: Sequence[Instance]) -> Instance:
        keys_by_layout: dict[tuple[bytes, int], list[bytes]] = {}
        n_prompt = len(request.prompt_token_ids)
        best: tuple[float, str] | None = None
        chosen = candidates[0]
        chosen_keys: list[bytes] = []
        any_hit = False
        for inst in candidates:
            hb = inst.heartbeat
            layout = (hb.kv_namespace, hb.block_size)
            keys = keys_by_layout.get(layout)
            if keys is None:
                keys = keys_by_layout[layout] = request.block_keys(hb.block_size, hb.kv_namespace) if hb.kv_namespace else []
            shared = kvstore_events_id(hb.kvstore_host) if hb.kvstore_host else None
            match = self.index.match(inst.instance_id, keys, shared)
            saved = (match.gpu + self.host_credit * match.host) * hb.block_size
            any_hit = any_hit or saved > 0
            score = (n_prompt - saved + inst.pending * self.queue_tokens, inst.instance_id)
            if best is None or score < best:
                best, chosen, chosen_keys = score, inst, keys
        least = min(inst.pending for inst in candidates)
        if chosen.pending > 2 * least + self.skew_slack:
            chosen = self._fallback.choose(request, candidates)
            self.last_reason = "skew"
        elif not any_hit:
            # Nothing cached anywhere: spread by load (ties rotate) rather than by id.
            chosen = self._fallback.choose(request, candidates)
            self.last_reason = "load"
        else:
            self.last_reason = "cache"
        if chosen is not None:
            hb = chosen.heartbeat
            keys = keys_by_layout.get((hb.kv_namespace, hb.block_size), chosen_keys)
            self.index.note_routed(chosen.instance_id, keys)
        return chosen


POLICIES: dict[str, type[RouterPolicy]] = {cls.name: cls for cls in (CacheAware, LeastLoaded, RoundRobin)}


def make_policy(name: str, index: PrefixIndex | None = None, queue_tokens: int = 128, host_credit: float = 0.5) -> RouterPolicy:
    """A policy by `--router` name; cache-aware routing reads (and notes guesses in)
    `index`, charges `queue_tokens` prompt tokens per pending request and credits
    `host_credit` of a block for each held in an instance's host-memory tier."""
    if name == CacheAware.name:
        return CacheAware(index, queue_tokens=queue_tokens, host_credit=host_credit)
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown router policy {name!r}; choose one of {', '.join(POLICIES)}") from None
