"""Page-locked host buffers for the loader's ring, fast to get.

cudaHostAlloc (torch's `pin_memory=True`) pins about 1.6 GB/s on the H100 machine of this
workplace (10 ms per 16 MiB slot) and does not speed up from several threads: a 256 MiB
ring cost as much as reading 2-4 GB of checkpoint from the page cache. Anonymous memory
advised into transparent huge pages (2 MiB pages: 512x fewer to pin and map) and then
page-locked with cudaHostRegister pins 1.4 GB/s from one thread but 8.5 GB/s from eight
(`bench/pinned_alloc.py`, docs/benchmarks.md), and the ring's readers allocate their
slots concurrently. Host-to-device copies from it run at the pinned rate (52-54 GB/s).

`PinnedBuffer` falls back to torch's pinned allocator where registering fails (no THP
is fine: it is only slower); `close()` unregisters and unmaps, after the copies that
read the buffer have finished and when nothing uses a view of it any more.
"""

from __future__ import annotations

import ctypes
import logging
import mmap

import torch

log = logging.getLogger(__name__)

_HUGE_PAGE = 2 << 20
_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every device's context
_register_failed = False  # once refused, use torch's allocator for the rest of the process


class PinnedBuffer:
    """`nbytes` of page-locked host memory as a uint8 tensor (`.tensor`), 4 KiB-aligned."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._map: mmap.mmap | None = None
        self._ptr = 0
        if not _register_failed:
            try:
                self.tensor = self._register(nbytes)
                return
            except (RuntimeError, OSError, AttributeError) as exc:
                _note_register_failure(exc)
        # torch's caching host allocator keeps the block for the next load.
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _register(self, nbytes: int) -> torch.Tensor:
        # One huge page more than needed, so the buffer can start on a 2 MiB boundary and
        # be backed by huge pages throughout (mmap only promises 4 KiB alignment).
        length = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE + _HUGE_PAGE
        mapping = mmap.mmap(-1, length)
        try:
            if hasattr(mmap, "MADV_HUGEPAGE"):
                mapping.madvise(mmap.MADV_HUGEPAGE)
            base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
            whole = torch.frombuffer(mapping, dtype=torch.uint8)
            whole[:: mmap.PAGESIZE].zero_()  # fault the pages in here, not inside the driver
            # All of the mapping, so the tensor's storage (which starts at the mapping)
            # is what torch's is_pinned() finds registered.
            err = torch.cuda.cudart().cudaHostRegister(base, length, _REGISTER_PORTABLE)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister returned {err}")
        except BaseException:
            mapping.close()
            raise
        self._map, self._ptr = mapping, base
        skip = -base % _HUGE_PAGE
        return whole[skip : skip + nbytes]

    def close(self) -> None:
        """Give the memory back (registered buffers: unregister and unmap). Every copy
        reading the buffer must have finished, and no view of `.tensor` may be used
        afterwards (torch.frombuffer does not keep the mapping open: such a view would
        point at unmapped memory)."""
        if self._map is None:
            return
        torch.cuda.cudart().cudaHostUnregister(self._ptr)
        del self.tensor
        self._map.close()
        self._map = None


def _note_register_failure(exc: BaseException) -> None:
    global _register_failed
    if not _register_failed:
        _register_failed = True
        log.info("cudaHostRegister of huge-page memory failed (%s); using cudaHostAlloc", exc)
