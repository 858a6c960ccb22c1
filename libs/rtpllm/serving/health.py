"""A health file for container healthchecks of the services that have no HTTP port.

The engines and the kvstore serve over NATS only, so Docker (or any supervisor) cannot
probe them directly. With `--health-file FILE` a service touches FILE every heartbeat
interval once it serves, as long as its NATS connection is up and its engine is alive;
`rtpllm health FILE` (the compose healthcheck) succeeds while the file is fresh. Touching
from the service's own event loop also proves that loop is not wedged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_MAX_AGE_S = 10.0


async def keep_fresh(path: str | Path, healthy: Callable[[], bool], interval_s: float = 1.0) -> None:
    """Touch `path` every `interval_s` while `healthy()`; remove it when cancelled, so a
    stopped service never looks healthy to the next healthcheck."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        while True:
            if healthy():
                target.touch()
            await asyncio.sleep(interval_s)
    finally:
        with contextlib.suppress(OSError):
            target.unlink()


def age_s(path: str | Path) -> float | None:
    """Seconds since `path` was last touched, or None if it does not exist."""
    try:
        return max(0.0, time.time() - os.stat(path).st_mtime)
    except OSError:
        return None


def main(path: str, max_age_s: float = DEFAULT_MAX_AGE_S) -> int:
    """`rtpllm health FILE`: exit 0 if FILE was touched within `max_age_s`."""
    age = age_s(path)
    if age is None:
        print(f"unhealthy: {path} does not exist (not serving yet, or stopped)")
        return 1
    if age > max_age_s:
        print(f"unhealthy: {path} last touched {age:.1f} s ago (more than {max_age_s:g} s)")
        return 1
    print(f"healthy: {path} touched {age:.1f} s ago")
    return 0
