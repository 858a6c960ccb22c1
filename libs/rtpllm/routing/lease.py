"""How long a peer may stay silent before it is presumed dead (ARCHITECTURE rule 5).

Pure bookkeeping, no I/O. A peer announces a lease (`lease_s` in its heartbeats); the
side that holds the lease also measures how far apart the peer's heartbeats actually
arrive, and never gives it less than `LEASE_BEATS` of those intervals:

    lease = max(announced, min(LEASE_BEATS x observed, MAX_STRETCH x announced))

where `observed` is the longest of the last `WINDOW` intervals. A peer whose beats come
late (a loaded host, a slow network) gets a longer lease instead of flapping; a single
long gap stretches the lease for `WINDOW` beats only, and never beyond `MAX_STRETCH`
times the announced lease, so a dead peer is still noticed in bounded time.

Time here is whatever clock the owner passes in; the services pass one that stops while
their own event loop is stalled (rtpllm.serving.liveness.LoopWatch), so a peer is never
blamed for heartbeats this process could not read.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

LEASE_BEATS = 3.0  # a lease lasts at least this many observed heartbeat intervals
WINDOW = 8  # heartbeat intervals remembered per peer
MAX_STRETCH = 10.0  # observed intervals stretch a lease to at most this multiple of the announced one


@dataclass
class BeatIntervals:
    """When one peer's recent heartbeats arrived; sizes its lease."""

    last: float | None = None
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def beat(self, now: float) -> None:
        """Record a heartbeat that arrived at `now`."""
        if self.last is not None and now >= self.last:
            self.recent.append(now - self.last)
        self.last = now

    @property
    def observed_s(self) -> float:
        """The longest recent interval (0 before the second heartbeat). The longest, not the
        mean: what matters is how long a healthy peer can go quiet, and beats that arrive
        in a burst (read late, all at once) must not shorten the lease."""
        return max(self.recent, default=0.0)

    def lease_s(self, announced_s: float) -> float:
        return max(announced_s, min(LEASE_BEATS * self.observed_s, MAX_STRETCH * announced_s))


@dataclass
class PeerLease:
    """One peer's lease as its holder sees it: when it was last heard from, the lease it
    announced, and when its recent heartbeats arrived."""

    last_seen: float
    announced_s: float
    beats: BeatIntervals = field(default_factory=BeatIntervals)

    def renew(self, now: float, announced_s: float) -> None:
        """A heartbeat announcing `announced_s` arrived at `now`."""
        self.last_seen = max(self.last_seen, now)
        self.announced_s = announced_s
        self.beats.beat(now)

    @property
    def expires_at(self) -> float:
        return self.last_seen + self.beats.lease_s(self.announced_s)
