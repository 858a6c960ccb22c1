"""Helpers shared by the serving benchmarks that drive whole stacks over HTTP
(bench/pd_interference.py, bench/prefix_routing.py)."""

from __future__ import annotations

from typing import Any

import httpx

from rtpllm.runtime.processes import redis_server_binary


def new_client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=30.0))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def strict_json(value: Any) -> Any:
    """NaN (nothing measured) as null: json.dumps would write NaN, which is not JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return value


def redis_installed() -> bool:
    """False on machines without a redis-server binary (the GPU machine): stacks run without it."""
    try:
        redis_server_binary()
    except FileNotFoundError:
        return False
    return True


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
