"""Connecting to NATS the same way in every service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)


async def connect_nats(url: str | list[str], name: str, wait_s: float = 30.0, **options: Any) -> NATS:
    """Connect, waiting up to `wait_s` seconds for the server (a service may start before
    NATS does); ConnectionError after that. `options` go to `nats.connect` as they are
    (credentials, TLS).

    Once connected the client reconnects forever on its own: a NATS restart costs the
    messages in flight (streams see a sequence gap and fail cleanly), not the service.
    """
    nc = NATS()
    connected = False
    last_note = [0.0]

    async def on_error(exc: Exception) -> None:
        if not connected:
            if time.monotonic() - last_note[0] > 5:
                last_note[0] = time.monotonic()
                log.info("waiting for NATS at %s (%s)", url, exc)
        elif not (nc.is_closed or nc.is_draining):
            log.warning("nats: %s", exc)

    async def on_disconnect() -> None:
        if connected and not (nc.is_closed or nc.is_draining):  # our own drain/close is no news
            log.warning("nats: disconnected from %s", url)

    async def on_reconnect() -> None:
        log.info("nats: reconnected to %s", url)

    try:
        await asyncio.wait_for(
            nc.connect(
                url,
                name=name,
                connect_timeout=2,
                reconnect_time_wait=0.5,
                max_reconnect_attempts=-1,  # also makes the first connect retry until wait_s
                ping_interval=10,
                max_outstanding_pings=3,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                **options,
            ),
            wait_s,
        )
    except (TimeoutError, OSError) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        raise ConnectionError(f"cannot connect to NATS at {url} within {wait_s:g} s") from exc
    connected = True
    return nc


async def connect_like(nc: NATS, name: str, wait_s: float = 10.0) -> NATS:
    """A second connection to the servers `nc` uses, with its credentials (user and
    password in the URLs or options, token, TLS). For traffic that must not wait on the
    event loop `nc` belongs to (a nats-py client runs on the loop that opened it), such as
    heartbeats published from their own thread."""
    urls = [server.geturl() for server in nc.servers]
    auth = {
        key: nc.options[key]
        for key in ("user", "password", "token", "tls", "tls_hostname")
        if nc.options.get(key)
    }
    return await connect_nats(urls, name, wait_s, **auth)
