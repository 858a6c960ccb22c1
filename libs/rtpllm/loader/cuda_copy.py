"""Host-to-device copies launched through the CUDA runtime torch already loaded, via ctypes.

A ring reader launches one copy per extent piece. Through torch that is two tensor
slices and a `copy_` (tens of microseconds of Python and dispatch, holding the GIL that
a dozen readers share); `cudaMemcpyAsync` called through ctypes on raw pointers costs a
few microseconds and releases the GIL while the driver queues the copy. The addresses
come from tensors the loader keeps alive for the whole load, so no tensor is created per
copy. Where the runtime library cannot be found (a torch that links it statically, no
CUDA), `cuda_runtime()` returns None and the loader uses `copy_`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice


class CudaRuntime:
    """The few runtime calls the loader needs, on the libcudart torch uses."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._memcpy = lib.cudaMemcpyAsync
        self._memcpy.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        self._memcpy.restype = ctypes.c_int
        self._error_string = lib.cudaGetErrorString
        self._error_string.argtypes = [ctypes.c_int]
        self._error_string.restype = ctypes.c_char_p

    def copy_h2d(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Queue `nbytes` from pinned host address `src` to device address `dst` on `stream`."""
        err = self._memcpy(dst, src, nbytes, _HOST_TO_DEVICE, stream)
        if err != 0:
            raise RuntimeError(f"cudaMemcpyAsync failed: {self._error_string(err).decode(errors='replace')}")


@functools.cache
def cuda_runtime() -> CudaRuntime | None:
    """The CUDA runtime library already mapped into this process (torch's), or None."""
    path = mapped_cudart()
    if path is None:
        return None
    try:
        return CudaRuntime(ctypes.CDLL(path))
    except (OSError, AttributeError) as exc:
        log.info("cannot use %s for loader copies (%s); using torch's copy_", path, exc)
        return None


def mapped_cudart() -> str | None:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    for line in maps.read_text().splitlines():
        path = line.split()[-1] if line.count(" ") >= 5 else ""
        if Path(path).name.startswith("libcudart.so"):
            return path
    return None
