"""SSD tier: one file per encoded block, committed by rename, LRU-bounded by bytes.

Layout: `<directory>/<first two hex digits of the key>/<key hex>.kvb`. A block is
written to a hidden temp file in the same shard (`.<key hex>.<random>.tmp`) and then
`os.replace`d onto its name, so a reader sees the whole block or no block (rule 6): a
crash mid-write leaves only a temp file, which no reader looks at and the next start
removes once it is older than `stale_temp_s` (younger ones may belong to a live writer).

No fsync by default: after a power loss a committed name may hold incomplete bytes, and
every read checks the header, length and CRC (block_codec.check_block), so such a file
is a miss, deleted and counted as `corrupt`. Pass `fsync=True` to pay for durability.

The index (key -> size, in LRU order) lives in memory and is rebuilt at start by
scanning the directory, oldest access first, so a restarted process finds what is
there. Reads set the file's times (os.utime) so recency survives restarts too. One
SSDTier per directory: two processes sharing one would each evict by their own count.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rtpllm.kvstore.block_codec import CorruptBlock, check_block
from rtpllm.kvstore.tier import TierStats

log = logging.getLogger(__name__)

SUFFIX = ".kvb"
TEMP_SUFFIX = ".tmp"


class SSDTier:
    """Encoded blocks as files under `directory`, at most `capacity_bytes` of them
    (file sizes), least recently used deleted first. See the module docstring."""

    name = "ssd"

    def __init__(
        self,
        directory: str | Path,
        capacity_bytes: int,
        *,
        fsync: bool = False,
        stale_temp_s: float = 60.0,
        read_threads: int = 4,
    ) -> None:
        self.directory = Path(directory)
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        # get_many reads files in parallel: an SSD needs several reads in flight to
        # reach its bandwidth, and reads and CRCs release the GIL.
        self.read_threads = read_threads
        self._readers: ThreadPoolExecutor | None = None
        self.stats = TierStats()
        self._index: OrderedDict[bytes, int] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._shards: set[str] = set()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._scan(stale_temp_s)

    # -- paths and start-up ---------------------------------------------------------

    def path(self, key: bytes) -> Path:
        h = key.hex()
        return self.directory / h[:2] / f"{h}{SUFFIX}"

    def _scan(self, stale_temp_s: float) -> None:
        found: list[tuple[float, bytes, int]] = []
        now = time.time()
        for shard in os.scandir(self.directory):
            if not shard.is_dir(follow_symlinks=False) or len(shard.name) != 2:
                continue
            self._shards.add(shard.name)
            for entry in os.scandir(shard.path):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.name.endswith(TEMP_SUFFIX):
                    if now - st.st_mtime > stale_temp_s:
                        _unlink(entry.path)
                    continue
                if not entry.name.endswith(SUFFIX):
                    continue
                try:
                    key = bytes.fromhex(entry.name[: -len(SUFFIX)])
                except ValueError:
                    continue
                found.append((max(st.st_atime, st.st_mtime), key, st.st_size))
        found.sort()
        for _, key, size in found:
            self._index[key] = size
            self._used += size
        evicted = self._evict_to(self.capacity_bytes)  # the capacity may have shrunk
        self.stats.add(evictions=len(evicted))
        if found:
            log.info("ssd tier %s: %d blocks, %d bytes found", self.directory, len(self._index), self._used)

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._index)

    # -- reads ------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            present = key in self._index
            if present:
                self._index.move_to_end(key)
        if not present:
            self.stats.add(misses=1)
            return None
        path = self.path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                data = f.readall()
        except FileNotFoundError:
            # Deleted behind our back (or evicted by another thread after the lookup).
            self._forget(key)
            self.stats.add(misses=1)
            return None
        except OSError as exc:
            log.warning("ssd tier: cannot read %s: %s", path, exc)
            self.stats.add(misses=1, errors=1)
            return None
        try:
            check_block(data)
        except CorruptBlock as exc:
            log.warning("ssd tier: corrupt block file %s deleted: %s", path, exc)
            self.delete(key)
            self.stats.add(misses=1, corrupt=1)
            return None
        try:
            os.utime(path)  # recency that survives a restart
        except OSError:
            pass
        self.stats.add(hits=1, bytes_read=len(data))
        return data

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if len(keys) < 2 or self.read_threads < 2:
            return [self.get(k) for k in keys]
        with self._lock:
            if self._readers is None:
                self._readers = ThreadPoolExecutor(self.read_threads, thread_name_prefix="kvstore-ssd-read")
            readers = self._readers
        return list(readers.map(self.get, keys))

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [k in self._index for k in keys]

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._index)

    # -- writes -----------------------------------------------------------------------

    def put(self, key: bytes, data: bytes) -> None:
        size = len(data)
        with self._lock:
            if key in self._index:  # immutable: the stored copy is as good
                self._index.move_to_end(key)
                return
        if size > self.capacity_bytes:
            self.stats.add(dropped_writes=1)
            return
        final = self.path(key)
        tmp = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
        try:
            self._ensure_shard(final.parent)
            self._write_file(tmp, data)
        except OSError as exc:
            _unlink(tmp)
            log.warning("ssd tier: cannot write %s (dropped): %s", final, exc)
            self.stats.add(dropped_writes=1, errors=1)
            return
        with self._lock:
            evicted = self._evict_to(self.capacity_bytes - size)
            try:
                os.replace(tmp, final)  # the commit
            except OSError as exc:
                _unlink(tmp)
                log.warning("ssd tier: cannot commit %s (dropped): %s", final, exc)
                self.stats.add(dropped_writes=1, errors=1, evictions=len(evicted))
                return
            if key not in self._index:
                self._used += size
            self._index[key] = size
        self.stats.add(bytes_written=size, evictions=len(evicted))

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        for key, data in items:
            self.put(key, data)

    def delete(self, key: bytes) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size
                _unlink(self.path(key))

    def close(self) -> None:
        with self._lock:
            readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True)

    # -- internals --------------------------------------------------------------------

    def _write_file(self, tmp: Path, data: bytes) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_shard(self, shard: Path) -> None:
        if shard.name not in self._shards:
            shard.mkdir(exist_ok=True)
            self._shards.add(shard.name)

    def _forget(self, key: bytes) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size

    def _evict_to(self, budget: int) -> list[bytes]:
        """Delete least recently used files until at most `budget` bytes remain
        (caller holds the lock). SSD is the last local tier: evicted blocks are gone."""
        evicted = []
        while self._used > budget and self._index:
            key, size = self._index.popitem(last=False)
            self._used -= size
            _unlink(self.path(key))
            evicted.append(key)
        return evicted


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
