"""The gateway's map of which instance holds which cached KV blocks (ARCHITECTURE rule 3).

Fed by the engines' KV events (`rtpllm.v1.kv.<instance>.events`): each instance's
batches carry consecutive sequence numbers, so a missing batch is noticed and the
instance's entries are rebuilt from a snapshot (`needs_resync`). A short-lived guess
index of this gateway's own routing decisions covers the time before an instance's
events arrive, so a burst of requests with one prefix lands on one instance.

Pure bookkeeping, no I/O: the dispatcher feeds it and asks for snapshots.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from rtpllm.kvcache.events import AllBlocksCleared, BlocksRemoved, BlocksStored, KVEventBatch


@dataclass
class _InstanceKeys:
    keys: set[bytes] = field(default_factory=set)  # in the KV pool (GPU)
    host: set[bytes] = field(default_factory=set)  # in the host-memory tier
    seq: int = -1  # last batch applied
    synced: bool = True  # False after a gap, until a snapshot replaces the keys


@dataclass(frozen=True)
class PrefixMatch:
    """How much of a prompt's chain of block keys an instance holds: the leading `gpu`
    blocks in its KV pool (or guessed there), then `host` more in its host-memory tier."""

    gpu: int = 0
    host: int = 0


class PrefixIndex:
    """Block keys cached per instance (KV pool and host-memory tier), plus recent
    routing guesses."""

    def __init__(self, guess_ttl_s: float = 10.0, max_guesses: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._instances: dict[str, _InstanceKeys] = {}
        self._guesses: OrderedDict[tuple[str, bytes], float] = OrderedDict()  # (instance, key) -> expiry
        self._guess_ttl_s = guess_ttl_s
        self._max_guesses = max_guesses
        self._clock = clock

    # -- events ----------------------------------------------------------------------

    def apply(self, instance_id: str, batch: KVEventBatch) -> bool:
        """Apply one batch of events; False if a batch is missing before it (the caller
        should ask the instance for a snapshot; entries stay, possibly stale)."""
        entry = self._instances.setdefault(instance_id, _InstanceKeys())
        if batch.seq == 0 and entry.seq >= 0:
            # The publisher started over (a restarted kvstore keeps its id; an engine
            # restarts under a new one): what we knew of its earlier life is void.
            entry = self._instances[instance_id] = _InstanceKeys()
        if batch.seq <= entry.seq:
            return True  # already covered (by a snapshot taken after it)
        if batch.seq != entry.seq + 1:
            # A lost batch, or this gateway started after the instance's first events:
            # what we hold is incomplete until a snapshot.
            entry.synced = False
        entry.seq = batch.seq
        for event in batch.events:
            if isinstance(event, BlocksStored):
                (entry.host if event.tier == "host" else entry.keys).update(event.block_keys)
            elif isinstance(event, BlocksRemoved):
                (entry.host if event.tier == "host" else entry.keys).difference_update(event.block_keys)
            elif isinstance(event, AllBlocksCleared):
                entry.keys.clear()
                entry.host.clear()
        return entry.synced

    def replace(self, instance_id: str, keys: Iterable[bytes], seq: int, host_keys: Iterable[bytes] = ()) -> None:
        """A snapshot: the instance's cached keys (pool, host tier) as of its event batch `seq`."""
        self._instances[instance_id] = _InstanceKeys(set(keys), set(host_keys), seq, True)

    def drop(self, instance_id: str) -> None:
        """The instance left or restarted: forget its keys and guesses."""
        self._instances.pop(instance_id, None)
        for guess in [g for g in self._guesses if g[0] == instance_id]:
            del self._guesses[guess]

    def needs_resync(self, instance_id: str) -> bool:
        entry = self._instances.get(instance_id)
        return entry is not None and not entry.synced

    def last_seq(self, instance_id: str) -> int:
        entry = self._instances.get(instance_id)
        return entry.seq if entry is not None else -1

    def num_keys(self, instance_id: str) -> int:
        """Blocks the instance holds in its KV pool."""
        entry = self._instances.get(instance_id)
        return len(entry.keys) if entry is not None else 0

    def num_host_keys(self, instance_id: str) -> int:
        """Blocks the instance holds in its host-memory tier."""
        entry = self._instances.get(instance_id)
        return len(entry.host) if entry is not None else 0

    # -- routing ---------------------------------------------------------------------

    def note_routed(self, instance_id: str, keys: Sequence[bytes]) -> None:
        """This gateway just sent a request with these block keys to the instance: until
        its events say so, guess that it will hold them."""
        expiry = self._clock() + self._guess_ttl_s
        for key in keys:
            guess = (instance_id, key)
            self._guesses[guess] = expiry
            self._guesses.move_to_end(guess)
        while len(self._guesses) > self._max_guesses:
            self._guesses.popitem(last=False)

    def match(self, instance_id: str, keys: Sequence[bytes], shared_host: str | None = None) -> PrefixMatch:
        """The leading keys of the chain the instance holds in its pool (known or
        guessed), then those after them in its host tier, or in the host tier
        published under `shared_host` (its host's kvstore: `kvstore_events_id`)."""
        entry = self._instances.get(instance_id)
        known = entry.keys if entry is not None else set()
        host = entry.host if entry is not None else set()
        shared = self._instances.get(shared_host) if shared_host else None
        now = self._clock()
        gpu = 0
        for key in keys:
            if key not in known:
                expiry = self._guesses.get((instance_id, key))
                if expiry is None or expiry < now:
                    break
            gpu += 1
        in_host = 0
        for key in keys[gpu:]:
            if key not in host and (shared is None or key not in shared.host):
                break
            in_host += 1
        return PrefixMatch(gpu, in_host)

    def expire_guesses(self) -> None:
        now = self._clock()
        while self._guesses:
            guess, expiry = next(iter(self._guesses.items()))
            if expiry >= now:
                break
            del self._guesses[guess]
