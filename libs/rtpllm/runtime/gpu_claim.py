"""One GPU per engine process on a multi-GPU host, without configuring each replica.

`docker compose up --scale decode=4` starts four identical containers; with a device
request of `count: 1` each would get the same first GPU. Instead every engine container
sees all GPUs and claims one: it takes an exclusive, non-blocking flock on
`DIR/gpu-<i>.lock` for the first index i no other process holds, and keeps the lock (and
so the GPU) for its lifetime. DIR is a volume shared by the engines of the host. The
kernel drops the lock when the process dies, so a crashed replica frees its GPU at once
and its restart (or the next replica) can take it; nothing is ever left to clean up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

# The open lock files of this process: closing one would release its GPU.
_held: list[int] = []


class NoFreeGPU(RuntimeError):
    """Every GPU of the host is claimed by another process."""


def claim_gpu(claim_dir: str | Path, count: int) -> int:
    """Claim the lowest-numbered GPU in [0, count) that no other process holds; the claim
    lasts as long as this process. Raises NoFreeGPU when all are taken."""
    if count <= 0:
        raise NoFreeGPU("no CUDA device is visible to this process")
    folder = Path(claim_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        fd = os.open(folder / f"gpu-{index}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())
        _held.append(fd)
        return index
    raise NoFreeGPU(
        f"all {count} GPU(s) are claimed by other engines (lock files in {folder}); scale down or add GPUs"
    )
