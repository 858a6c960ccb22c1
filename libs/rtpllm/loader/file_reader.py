"""Positioned reads of checkpoint files: buffered, O_DIRECT, and a page-cache residency probe.

Reads use os.preadv, which fills caller-owned buffers (a pinned ring slot or the
destination tensor itself) with no intermediate bytes object and releases the GIL, so
several threads read at once. O_DIRECT skips the page cache: for a cold file it lets
each 16 MiB read go to the device as a few large requests at a deep queue depth instead
of readahead-sized ones; for a file already in the page cache it would be far slower
than a memcpy from the cache, so `read_into` first asks mincore() whether the extent
is cached. (A preadv(RWF_NOWAIT) probe would be simpler, but recent kernels start
readahead I/O when it misses, which competes with the direct reads.)
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from rtpllm.loader.load_plan import ALIGN, align_down
from rtpllm.loader.weights import CheckpointError

log = logging.getLogger(__name__)


class CheckpointFile:
    """Open descriptors for one file: buffered always; O_DIRECT and a residency probe when asked."""

    def __init__(self, path: Path, *, want_direct: bool) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise CheckpointError(f"cannot open {path}: {exc}") from exc
        self.size = os.fstat(self.fd).st_size
        self.direct_fd: int | None = None
        self.direct_ok = False  # direct_fd is open and no read through it was refused
        self._map: _Mapping | None = None
        self._lock = threading.Lock()
        if want_direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:  # tmpfs and some FUSE/network filesystems refuse O_DIRECT
                log.info("O_DIRECT not available for %s (%s); using the page cache", path, exc)
            else:
                self.direct_ok = True
                self._map = _Mapping.create(self.fd, self.size)

    def is_cached(self, offset: int, end: int) -> bool | None:
        """Whether bytes [offset, end) are in the page cache: True/False when a few pages
        spread over the range all agree, None when they differ or nobody can tell.

        Sampling costs a few microseconds per extent; reading the whole range's residency
        would cost ~90 ns per 4 KiB page, a third of a second for 16 GB.
        """
        if self._map is None or end <= offset:
            return None
        first, last = offset // mmap.PAGESIZE, (end - 1) // mmap.PAGESIZE
        pages = {first + (last - first) * k // (_SAMPLES - 1) for k in range(_SAMPLES)}
        states = {self._map.page_cached(p) for p in pages}
        return states.pop() if len(states) == 1 else None

    def disable_direct(self, reason: str) -> None:
        """Stop using O_DIRECT for this file (the filesystem refused a read).

        The descriptor stays open until close(): another reader thread may be using it,
        and a closed number could be reused by an unrelated open() under its feet.
        """
        with self._lock:
            if self.direct_ok:
                log.info("O_DIRECT read of %s failed (%s); using the page cache", self.path, reason)
                self.direct_ok = False

    def close(self) -> None:
        """Close the descriptors and unmap the probe mapping."""
        os.close(self.fd)
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None
        if self._map is not None:
            self._map.close()
            self._map = None


# Pages sampled per extent by CheckpointFile.is_cached.
_SAMPLES = 5


def read_into(
    file: CheckpointFile, buf: memoryview, offset: int, needed: int, *, direct: bool | None
) -> bool:
    """Fill buf[:needed] with file bytes [offset, offset + needed); True if read with O_DIRECT.

    `offset` and the buffer address must be ALIGN-aligned and `buf` must reach past
    `needed` to the next aligned length (O_DIRECT reads whole blocks). `direct`: False
    reads through the page cache, True with O_DIRECT, None with O_DIRECT only when the
    range is not in the page cache. Without O_DIRECT it uses the page cache.
    """
    if direct is None:
        direct = file.is_cached(offset, offset + needed) is False
    fd = file.direct_fd
    if direct and fd is not None and file.direct_ok:
        try:
            _read_loop(file, fd, buf, offset, needed, aligned=True)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise CheckpointError(f"cannot read {file.path} at offset {offset}: {exc}") from exc
            file.disable_direct(str(exc))
    try:
        _read_loop(file, file.fd, buf, offset, needed, aligned=False)
    except OSError as exc:
        raise CheckpointError(f"cannot read {file.path} at offset {offset}: {exc}") from exc
    return False


def _read_loop(
    file: CheckpointFile, fd: int, buf: memoryview, offset: int, needed: int, *, aligned: bool
) -> None:
    got = 0
    stop = min(len(buf), -(-needed // ALIGN) * ALIGN) if aligned else needed
    while got < needed:
        n = os.preadv(fd, [buf[got:stop]], offset + got)
        # O_DIRECT can only resume at an aligned offset; a short read that ends before
        # the next aligned offset is the end of the file.
        new = got + n if not aligned or got + n >= needed else align_down(got + n)
        if n <= 0 or new <= got:
            raise CheckpointError(
                f"{file.path} ended at byte {offset + got + max(n, 0)} while reading up to {offset + needed}: "
                "the file was truncated while loading"
            )
        got = new


def scatter_read(file: CheckpointFile, bufs: list[memoryview], offset: int) -> None:
    """One preadv of consecutive file bytes from `offset` into `bufs`, in order (page cache)."""
    total = sum(len(b) for b in bufs)
    done = 0
    try:
        while done < total:
            n = os.preadv(file.fd, bufs, offset + done)
            if n <= 0:
                raise CheckpointError(
                    f"{file.path} ended at byte {offset + done} while reading up to {offset + total}: "
                    "the file was truncated while loading"
                )
            done += n
            bufs = _advance(bufs, n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {file.path} at offset {offset + done}: {exc}") from exc


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    # Drop the first n bytes of the buffer list after a short read.
    out = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


def resident_pages(file: CheckpointFile) -> np.ndarray | None:
    """Per-page flags (1 = in the page cache) for the whole file, or None if unknown.

    For diagnostics (the benchmark checks a cache drop with it): ~90 ns per page.
    """
    mapping = _Mapping.create(file.fd, file.size)
    if mapping is None:
        return None
    try:
        vec = np.zeros(-(-file.size // mmap.PAGESIZE), dtype=np.uint8)
        if mapping.libc.mincore(ctypes.c_void_p(mapping.addr), file.size, vec.ctypes.data) != 0:
            return None
    finally:
        mapping.close()
    return vec & 1


class _Mapping:
    """A PROT_READ, MAP_SHARED mapping of a whole file, only ever passed to mincore().

    Nothing touches its pages, so it costs no I/O and no memory; mincore() on it reports
    the page-cache state of the file's pages. Python's mmap module cannot hand out the
    address of a read-only mapping, hence libc through ctypes.
    """

    def __init__(self, libc: ctypes.CDLL, addr: int, size: int) -> None:
        self.libc, self.addr, self.size = libc, addr, size

    @staticmethod
    def create(fd: int, size: int) -> _Mapping | None:
        if size == 0:
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_long,
            ]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        except (OSError, AttributeError):  # no libc mmap/mincore (not Linux)
            return None
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        return _Mapping(libc, addr, size)

    def page_cached(self, page: int) -> bool | None:
        vec = ctypes.c_ubyte()  # per call: reader threads probe concurrently
        ok = self.libc.mincore(ctypes.c_void_p(self.addr + page * mmap.PAGESIZE), 1, ctypes.byref(vec)) == 0
        return bool(vec.value & 1) if ok else None

    def close(self) -> None:
        self.libc.munmap(ctypes.c_void_p(self.addr), self.size)
