"""Checks of optional dependencies that /ready reports (Redis now; its KV tier arrives
with the kvstore). A missing optional dependency is reported, never fatal: losing a
cache tier may cost speed, never correctness."""

from __future__ import annotations

import redis.asyncio as aioredis


class RedisCheck:
    """Pings a Redis URL; keeps one client so /ready stays cheap."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self._client = aioredis.from_url(url, socket_connect_timeout=1, socket_timeout=1) if url else None

    async def status(self) -> str:
        """"ok", "not configured", or "unreachable: <why>"."""
        if self._client is None:
            return "not configured"
        try:
            await self._client.ping()
        except Exception as exc:  # any failure means "not usable now"
            return f"unreachable: {exc}"
        return "ok"

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
