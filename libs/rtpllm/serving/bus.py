"""Connecting to NATS the same way in every service: where the server is, the
credentials it wants (a token, or a user and password) and TLS for an external one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import nats.errors
from nats.aio.client import Client as NATS

from rtpllm.credentials import split_userinfo, with_userinfo

log = logging.getLogger(__name__)

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
# TLS files may ride in a URL's query (`?tls_ca=/etc/ca.pem`), so that one string can
# describe a whole connection where only a string is passed (the engines' kvstore
# client gets `OffloadConfig.kvstore_nats_url`). Only rtpllm reads them; nats-py never
# sees the query.
_TLS_QUERY = ("tls_ca", "tls_cert", "tls_key")


@dataclass(frozen=True)
class NatsConfig:
    """How a service reaches NATS: the server URL(s), comma-separated, and what an
    authenticated or external server asks for.

    Credentials may also come in the URL (`nats://user:password@host:port`,
    `nats://token@host:port`, percent-encoded); the explicit fields win over them. A
    token and a user cannot both be given. With any TLS file the connection must be TLS:
    `tls_ca` verifies the server, `tls_cert` + `tls_key` are this client's certificate.
    """

    url: str = DEFAULT_NATS_URL
    token: str | None = None
    user: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if self.token and self.user:
            raise ValueError("NATS: give a token or a user and password, not both")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("NATS: a TLS client certificate needs both --nats-tls-cert and --nats-tls-key")

    def __repr__(self) -> str:  # never the secrets: settings get logged
        return f"NatsConfig(url={self.display!r}, auth={self.auth_kind!r}, tls={self.tls})"

    @classmethod
    def from_url(cls, url: str | Sequence[str]) -> NatsConfig:
        """A config from URL(s) alone, reading TLS files from a query (see `as_url`)."""
        urls = _split(url)
        tls: dict[str, str] = {}
        for u in urls:
            query = parse_qs(urlsplit(u).query)
            for key in _TLS_QUERY:
                if key in query and key not in tls:
                    tls[key] = query[key][0]
        return cls(",".join(urls), **tls)

    @property
    def servers(self) -> list[str]:
        """The server URLs as nats-py gets them: no credentials, no query."""
        out = []
        for u in _split(self.url):
            bare, _, _ = split_userinfo(u)
            parts = urlsplit(bare)
            out.append(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))
        return out

    @property
    def display(self) -> str:
        """The servers, for log lines (never a credential)."""
        return ",".join(self.servers)

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert) or any(urlsplit(u).scheme == "tls" for u in self.servers)

    def credentials(self) -> tuple[str | None, str | None, str | None]:
        """(token, user, password) in force: the explicit fields, else the first URL
        that carries any (a user alone in a URL is a token, as nats-py reads it)."""
        if self.token or self.user:
            return self.token, self.user, self.password
        for u in _split(self.url):
            _, user, password = split_userinfo(u)
            if user is not None and password is None:
                return user, None, None
            if user is not None or password is not None:
                return None, user, password
        return None, None, None

    @property
    def auth_kind(self) -> str:
        token, user, _ = self.credentials()
        return "token" if token else "user" if user else "none"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context, None without TLS. The system's CAs unless `tls_ca`."""
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        if self.tls_cert and self.tls_key:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `nats.connect` for the credentials and TLS."""
        token, user, password = self.credentials()
        options: dict[str, Any] = {}
        if token:
            options["token"] = token
        if user:
            options["user"] = user
            options["password"] = password or ""
        context = self.ssl_context()
        if context is not None:
            options["tls"] = context
        return options

    def as_url(self) -> str:
        """One string for the whole config, credentials in the userinfo and TLS files in
        the query of every server URL; `NatsConfig.from_url` reads it back."""
        token, user, password = self.credentials()
        query = urlencode({k: v for k in _TLS_QUERY if (v := getattr(self, k))})
        out = []
        for server in self.servers:
            parts = urlsplit(with_userinfo(server, token or user, None if token else password))
            out.append(urlunsplit((parts.scheme, parts.netloc, parts.path, query, "")))
        return ",".join(out)


def _split(url: str | Sequence[str]) -> list[str]:
    urls = url.split(",") if isinstance(url, str) else list(url)
    return [u.strip() for u in urls if u.strip()]


def _refused(exc: BaseException) -> bool:
    """An error that retrying will not fix: wrong credentials, a certificate that does
    not verify."""
    if isinstance(exc, ssl.SSLError):
        return True
    return isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()


async def connect_nats(
    target: NatsConfig | str | Sequence[str], name: str, wait_s: float = 30.0, **options: Any
) -> NATS:
    """Connect, waiting up to `wait_s` seconds for the server (a service may start before
    NATS does); ConnectionError after that, or at once when the server refuses the
    credentials (a retry would not help). `target` is a config, or URL(s) that may carry
    credentials and TLS files (`NatsConfig.from_url`); `options` go to `nats.connect`.

    Once connected the client reconnects forever on its own: a NATS restart costs the
    messages in flight (streams see a sequence gap and fail cleanly), not the service.
    """
    config = target if isinstance(target, NatsConfig) else NatsConfig.from_url(target)
    where = config.display
    nc = NATS()
    connected = False
    last_note = [0.0]
    refused: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        if not connected:
            if _refused(exc) and not refused.done():
                refused.set_result(exc)
            elif time.monotonic() - last_note[0] > 5:
                last_note[0] = time.monotonic()
                log.info("waiting for NATS at %s (%s)", where, exc)
        elif not (nc.is_closed or nc.is_draining):
            log.warning("nats: %s", exc)

    async def on_disconnect() -> None:
        if connected and not (nc.is_closed or nc.is_draining):  # our own drain/close is no news
            log.warning("nats: disconnected from %s", where)

    async def on_reconnect() -> None:
        log.info("nats: reconnected to %s", where)

    connecting = asyncio.ensure_future(
        nc.connect(
            config.servers,
            name=name,
            connect_timeout=2,
            reconnect_time_wait=0.5,
            max_reconnect_attempts=-1,  # also makes the first connect retry until wait_s
            ping_interval=10,
            max_outstanding_pings=3,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            **{**config.options(), **options},
        )
    )
    try:
        done, _ = await asyncio.wait(
            {connecting, refused}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
        )
    except asyncio.CancelledError:
        connecting.cancel()
        raise
    if connecting not in done or connecting.exception() is not None:
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        if refused.done():
            raise ConnectionError(
                f"NATS at {where} refused {name}: {refused.result()} (check the NATS token, user and password, or TLS files)"
            )
        cause = connecting.exception() if connecting.done() and not connecting.cancelled() else None
        raise ConnectionError(f"cannot connect to NATS at {where} within {wait_s:g} s") from cause
    refused.cancel()
    # nats-py upgrades to TLS only when the server asks for it; with TLS configured, a
    # plain server is a misconfiguration (or an impostor) that must not go unnoticed.
    if config.tls and not getattr(nc, "_server_info", {}).get("tls_required", False):
        await nc.close()
        raise ConnectionError(f"NATS at {where} does not use TLS, but TLS was configured for it")
    connected = True
    return nc


async def connect_like(nc: NATS, name: str, wait_s: float = 10.0) -> NATS:
    """A second connection to the servers `nc` uses, with its credentials (user and
    password or token, TLS). For traffic that must not wait on the event loop `nc`
    belongs to (a nats-py client runs on the loop that opened it), such as heartbeats
    published from their own thread."""
    urls = [server.geturl() for server in nc.servers]
    auth = {
        key: nc.options[key]
        for key in ("user", "password", "token", "tls", "tls_hostname")
        if nc.options.get(key)
    }
    return await connect_nats(urls, name, wait_s, **auth)
