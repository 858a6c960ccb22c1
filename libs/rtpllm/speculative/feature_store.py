"""The target's hidden-state features an EAGLE head has not consumed yet.

Every target step (with EAGLE on) hands over the features of the rows it computed for
requests that may speculate; the head consumes a request's rows when it next proposes
for it (its catch-up pass). They wait here, per request, as rows of consecutive target
positions in one pool allocated at start: memory is bounded whatever the policy does.
When the pool is full, the requests least recently added to or taken from lose theirs
(the head then starts a new context for them at their next rows: eagle.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class _Pending:
    first: int  # target position of slots[0]
    slots: list[int] = field(default_factory=list)
    last_used: int = 0

    @property
    def end(self) -> int:
        return self.first + len(self.slots)


@dataclass(frozen=True)
class FeatureSpan:
    """Rows of a target step for one request: `count` positions from `position`, at
    packed row `row` of the step's features. Positions below `floor` are not needed
    (the head has them) when the request has nothing pending."""

    request_id: str
    position: int
    row: int
    count: int
    floor: int = 0


class FeatureStore:
    """Pending feature rows per request, in a pool of `capacity` rows of `width`."""

    def __init__(self, capacity: int, width: int, dtype: torch.dtype, device: str) -> None:
        self.capacity = capacity
        self.device = device
        self.rows = torch.empty(capacity, width, dtype=dtype, device=device)
        self._free = list(range(capacity - 1, -1, -1))  # a stack: low slots first
        self._pending: dict[str, _Pending] = {}
        self._tick = 0
        self.evicted_rows = 0  # rows dropped for room (stats, tests)

    @property
    def num_pending(self) -> int:
        return self.capacity - len(self._free)

    def pending(self, request_id: str) -> tuple[int, int]:
        """(first position, count) of a request's pending rows; (0, 0) when none."""
        p = self._pending.get(request_id)
        return (p.first, len(p.slots)) if p is not None else (0, 0)

    def add(self, spans: Sequence[FeatureSpan], features: torch.Tensor) -> None:
        """Store the spans' rows of a step's `features` ([rows, width], packed order): one
        gather and one scatter on the device. A span continues its request's pending
        rows; its positions already pending are skipped, and a span past their end (a
        gap: rows the target computed without this store) replaces them."""
        self._tick += 1
        plan: list[tuple[str, int, int, int]] = []  # (request, first position, packed row, rows)
        for s in spans:
            p = self._pending.get(s.request_id)
            start = p.end if p is not None and s.position <= p.end else (s.floor if p is None else s.position)
            start = max(start, s.position)
            if start >= s.position + s.count:
                continue
            if p is not None and start > p.end:
                self.drop(s.request_id)
            plan.append((s.request_id, start, s.row + start - s.position, s.position + s.count - start))
        need = sum(n for *_, n in plan)
        if need > self.capacity:  # more than the pool holds (cannot happen with the engine's sizing)
            plan, need = [], 0
        adding = {rid for rid, *_ in plan}
        self._make_room(need, adding)
        src: list[int] = []
        dst: list[int] = []
        for rid, position, row, n in plan:
            p = self._pending.get(rid)
            if p is None or p.end != position:  # evicted just now, or new
                self.drop(rid)
                p = self._pending[rid] = _Pending(position)
            slots = [self._free.pop() for _ in range(n)]
            p.slots.extend(slots)
            p.last_used = self._tick
            src.extend(range(row, row + n))
            dst.extend(slots)
        if src:
            self.rows.index_copy_(0, self._index(dst), features.index_select(0, self._index(src)).to(self.rows.dtype))

    def take(self, wants: Sequence[tuple[str, int]]) -> torch.Tensor:
        """The first `count` pending rows of each (request, count), concatenated in that
        order (one gather); they leave the store."""
        self._tick += 1
        slots: list[int] = []
        for rid, count in wants:
            p = self._pending[rid]
            assert count <= len(p.slots), (rid, count, len(p.slots))
            slots.extend(p.slots[:count])
            del p.slots[:count]
            p.first += count
            p.last_used = self._tick
            if not p.slots:
                del self._pending[rid]
        out = self.rows.index_select(0, self._index(slots))
        self._free.extend(reversed(slots))
        return out

    def drop(self, request_id: str) -> None:
        p = self._pending.pop(request_id, None)
        if p is not None:
            self._free.extend(reversed(p.slots))

    def clear(self) -> None:
        for rid in list(self._pending):
            self.drop(rid)

    def _make_room(self, need: int, adding: set[str]) -> None:
        """Drop whole requests' rows, least recently used first (others before those
        being added to), until `need` slots are free."""
        while len(self._free) < need and self._pending:
            victim = min(self._pending, key=lambda rid: (rid in adding, self._pending[rid].last_used))
            self.evicted_rows += len(self._pending[victim].slots)
            self.drop(victim)

    def _index(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.long)
        if self.device.startswith("cuda"):
            return t.pin_memory().to(self.device, non_blocking=True)
        return t
