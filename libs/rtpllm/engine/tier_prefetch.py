"""KV-tier lookups and restores off the engine's step loop (ARCHITECTURE rule 8: the
step loop never waits on the network; docs/kvstore.md, "In the engine").

- **Lookup, prefetched.** When a request is added, `lookup` asks the tiers, on a worker
  thread, which of the blocks past the pool's prefix hit they hold. When the scheduler
  comes to admit the request, `prefix` uses the answer if it is there. If it is not,
  the request stays waiting while the others run, for at most `wait_cap(blocks)`
  (about the prefill time those blocks would save), and is then computed: a slow or
  hung tier costs misses, never a stall of other requests.
- **Restore, in the background.** With an answer, the blocks worth restoring are taken
  from the pool (`BlockManager.reserve_restore`: referenced and out of the prefix cache,
  so nothing reads or reuses them) and `fetch_into` fills them on another worker thread
  while the request keeps waiting. Once the fetch has returned (after which nothing
  writes the blocks: the `EngineKVStore` contract), the blocks it filled are offered to
  the prefix cache and the request is admitted with them as ordinary prefix hits. A
  restore that fails or comes short is a shorter hit: the rest is computed (rule 6).
- **Too slow.** A restore still running after its cap is left to finish on its own: the
  request is computed at once, and the blocks stay with the fetch until it returns
  (`settle`); then what it filled is cached (late, but valid KV) and the rest freed.

Everything here runs on the engine thread except the tier calls themselves; the worker
threads only run `lookup`/`fetch_into` and signal completion.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rtpllm.kvcache.block_manager import BlockManager
from rtpllm.kvstore.engine_store import EngineKVStore

if TYPE_CHECKING:
    from rtpllm.engine.kv_offload import OffloadStats

log = logging.getLogger(__name__)


@dataclass
class _Lookup:
    """A tier lookup for one request's blocks from `have` (the pool's hit then) on."""

    have: int
    future: Future[list[str]] | None  # None: not asked (too many lookups queued), a miss
    since: float | None = None  # when the scheduler first wanted the request


@dataclass
class _Restore:
    """A fetch into `block_ids` (held by `owner`) of the blocks of `keys`."""

    owner: str
    keys: list[bytes]
    block_ids: list[int]
    tiers: list[str]  # where each block was found
    parent: bytes | None  # the key before keys[0] in the chain
    future: Future[int]
    started: float
    cap_s: float


class TierPrefetch:
    """Background lookups and restores between `tiers` and the pool of `block_manager`.

    `plan(tiers)`: how many leading blocks of a chain found in `tiers` to restore (the
    cost model); `wait_cap(n)`: how long a request may wait for the tiers about `n`
    blocks; `before_write()`: store the blocks `reserve_restore` evicted from the prefix
    cache before a fetch overwrites them. At most `max_lookups` lookups and
    `max_restores` restores holding `max_restore_blocks` blocks in all are in flight
    (abandoned ones included): past that, requests are computed. A hung tier would
    otherwise pile up work for the threads and hold blocks the pool needs: blocks of a
    fetch that never returns are never reused.
    """

    def __init__(
        self,
        tiers: EngineKVStore,
        block_manager: BlockManager,
        stats: OffloadStats,
        *,
        plan: Callable[[Sequence[str]], int],
        wait_cap: Callable[[int], float],
        before_write: Callable[[], None],
        lookup_threads: int = 4,
        fetch_threads: int = 2,
        max_lookups: int = 64,
        max_restores: int = 8,
        max_restore_blocks: int | None = None,
    ) -> None:
        self.tiers = tiers
        self.bm = block_manager
        self.stats = stats
        self._plan = plan
        self._wait_cap = wait_cap
        self._before_write = before_write
        self.max_lookups = max_lookups
        self.max_restores = max_restores
        self.max_restore_blocks = (
            max_restore_blocks if max_restore_blocks is not None else block_manager.num_blocks // 2
        )
        # Separate pools: lookups stuck on a hung tier must not queue restores behind them.
        self._lookup_pool = ThreadPoolExecutor(lookup_threads, thread_name_prefix="rtpllm-tier-lookup")
        self._fetch_pool = ThreadPoolExecutor(fetch_threads, thread_name_prefix="rtpllm-tier-fetch")
        self._lookups: dict[str, _Lookup] = {}
        self._restores: dict[str, _Restore] = {}
        self._orphans: list[_Restore] = []  # restores no request waits for any more
        self._answered: dict[str, int] = {}  # request -> the admission its tiers answered
        self._queued_lookups = 0  # submitted, not finished (guarded by _lock: worker threads end them)
        self._lock = threading.Lock()
        self._woken = threading.Event()  # a lookup or fetch ended
        self._owners = itertools.count()

    # -- the engine's calls -------------------------------------------------------------

    def lookup(self, request_id: str, keys: Sequence[bytes], have: int) -> None:
        """Start looking up `keys[have:]` (the request's full-block keys past the `have`
        blocks the pool holds) for when the request is admitted."""
        if len(keys) > have:
            self._lookups[request_id] = _Lookup(have, self._submit_lookup(list(keys[have:])))

    def prefix(
        self, request_id: str, keys: Sequence[bytes], hit: Sequence[int], admission: int = 0
    ) -> int | None:
        """The scheduler wants to admit the request, whose pool prefix hit is blocks `hit`
        of its chain `keys`. None: keep it waiting (its lookup or restore is under way
        and within its cap). Else how many blocks past the hit were restored and cached
        (0: nothing, or gave up).

        The tiers are asked once per `admission` (the request's preemption count): a
        request answered but then refused for lack of blocks is not looked up (and kept
        waiting) again, which would let the requests behind it pass it every time."""
        if (
            request_id not in self._lookups
            and request_id not in self._restores
            and self._answered.get(request_id) == admission
        ):
            return 0
        restored = self._prefix(request_id, keys, hit, time.monotonic())
        if restored is not None:
            self._answered[request_id] = admission
        return restored

    def _prefix(self, request_id: str, keys: Sequence[bytes], hit: Sequence[int], now: float) -> int | None:
        restore = self._restores.get(request_id)
        if restore is not None:
            return self._restore_result(request_id, restore, now)
        have = len(hit)
        rest = list(keys[have:])
        lookup = self._lookups.get(request_id)
        if not rest:
            self._lookups.pop(request_id, None)
            return 0
        if lookup is None or lookup.have > have:
            # Never asked (re-admitted after a preemption; a later sample of n > 1), or the
            # pool lost part of the prefix since: ask about what follows the hit now. The
            # wait already spent counts against the cap.
            since = lookup.since if lookup is not None else None
            lookup = self._lookups[request_id] = _Lookup(have, self._submit_lookup(rest), since)
        if lookup.since is None:
            lookup.since = now
        future = lookup.future
        if future is not None and not future.done():
            if now - lookup.since < self._wait_cap(len(rest)):
                return None
            self.stats.late_lookups += 1  # answers too late to pay: a miss
            log.debug(
                "KV tier lookup for %s unanswered after %.0f ms: computing it",
                request_id,
                (now - lookup.since) * 1e3,
            )
            future = None
        del self._lookups[request_id]
        # The pool may hold more of the chain than when the lookup was asked.
        where = future.result()[have - lookup.have :] if future is not None else []
        n = min(self._plan(where), len(rest))
        if n == 0:
            return 0
        held = sum(len(r.block_ids) for r in (*self._restores.values(), *self._orphans))
        room = (
            0
            if len(self._restores) + len(self._orphans) >= self.max_restores
            else self.max_restore_blocks - held
        )
        if room < n:
            self.stats.dropped_restores += n - max(room, 0)
            n = room
        if n <= 0:
            return 0
        return self._start_restore(
            request_id, rest[:n], where[:n], keys[have - 1] if have else None, hit, now
        )

    def forget(self, request_id: str) -> None:
        """The request ended (finished, aborted): drop its lookup; its restore finishes
        on its own and its blocks come back in `settle`."""
        self._lookups.pop(request_id, None)
        self._answered.pop(request_id, None)
        restore = self._restores.pop(request_id, None)
        if restore is not None:
            self._orphan(restore)

    def settle(self) -> None:
        """Give the blocks of abandoned restores that have ended back to the pool (what
        they filled cached). Once per step, before scheduling."""
        if not self._orphans:
            return
        running: list[_Restore] = []
        for restore in self._orphans:
            if restore.future.done():
                self._land(restore, for_request=False)
            else:
                running.append(restore)
        self._orphans = running

    @property
    def busy(self) -> bool:
        """Some waiting request has a lookup or restore under way."""
        return bool(self._lookups or self._restores)

    def wait(self, timeout_s: float) -> None:
        """Sleep until a lookup or fetch ends, at most `timeout_s`: for an engine with
        nothing to run but requests waiting for the tiers (instead of spinning)."""
        self._woken.wait(timeout_s)
        self._woken.clear()

    def close(self) -> None:
        """Stop the worker threads (without waiting for a hung tier)."""
        for pool in (self._lookup_pool, self._fetch_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    # -- internals ----------------------------------------------------------------------

    def _submit_lookup(self, keys: list[bytes]) -> Future[list[str]] | None:
        with self._lock:
            if self._queued_lookups >= self.max_lookups:
                self.stats.dropped_lookups += 1
                return None
            self._queued_lookups += 1
        future = self._lookup_pool.submit(self._safe_lookup, keys)
        future.add_done_callback(self._lookup_ended)
        return future

    def _lookup_ended(self, _future: Future[list[str]]) -> None:
        with self._lock:
            self._queued_lookups -= 1
        self._woken.set()

    def _start_restore(
        self,
        request_id: str,
        keys: list[bytes],
        tiers: list[str],
        parent: bytes | None,
        hit: Sequence[int],
        now: float,
    ) -> int | None:
        owner = f"\0tier-restore-{next(self._owners)}"  # not a request id: those are printable
        block_ids = self.bm.reserve_restore(owner, hit, len(keys))
        if not block_ids:
            return 0
        # reserve_restore may have taken free blocks still caching other prefixes: store
        # them before the fetch overwrites them.
        self._before_write()
        keys = keys[: len(block_ids)]
        future = self._fetch_pool.submit(self._safe_fetch, keys, block_ids)
        future.add_done_callback(lambda _f: self._woken.set())
        self._restores[request_id] = _Restore(
            owner,
            keys,
            block_ids,
            tiers[: len(block_ids)],
            parent,
            future,
            now,
            self._wait_cap(len(block_ids)),
        )
        return None

    def _restore_result(self, request_id: str, restore: _Restore, now: float) -> int | None:
        if not restore.future.done():
            if now - restore.started < restore.cap_s:
                return None
            # Slower than computing them: compute the request now; the fetch keeps its
            # blocks until it returns.
            del self._restores[request_id]
            self.stats.late_restores += 1
            log.debug(
                "KV tier restore for %s unfinished after %.0f ms: computing it",
                request_id,
                restore.cap_s * 1e3,
            )
            self._orphan(restore)
            return 0
        del self._restores[request_id]
        return self._land(restore, for_request=True)

    def _orphan(self, restore: _Restore) -> None:
        if restore.future.cancel():  # never started: nothing wrote its blocks
            self.bm.free(restore.owner)
        else:
            self._orphans.append(restore)

    def _land(self, restore: _Restore, *, for_request: bool) -> int:
        """The fetch has returned: cache the blocks it filled, free the rest."""
        good = max(0, min(restore.future.result(), len(restore.block_ids)))
        cached = self.bm.cache_restored(restore.block_ids[:good], restore.keys[:good], restore.parent)
        self.bm.free(restore.owner)  # restored blocks stay cached; the others are empty again
        self.stats.failed_restores += len(restore.block_ids) - good
        if for_request:
            for tier in restore.tiers[:good]:
                self.stats.restored_blocks[tier] += 1
        else:
            self.stats.late_restored_blocks += cached
        return good

    def _safe_lookup(self, keys: list[bytes]) -> list[str]:
        try:
            return self.tiers.lookup(keys)
        except Exception:  # tiers report misses, not errors; a bug must not wedge a request
            log.exception("KV tier lookup failed")
            return []

    def _safe_fetch(self, keys: list[bytes], block_ids: list[int]) -> int:
        try:
            return self.tiers.fetch_into(keys, block_ids)
        except Exception:
            log.exception("KV tier restore failed")
            return 0
