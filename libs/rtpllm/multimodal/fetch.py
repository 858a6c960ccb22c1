"""Fetch image bytes for `image_url` parts without opening an SSRF hole.

A client-supplied URL is a request the server makes on the client's behalf, from inside
our network. So, per hop:

1. only `http`/`https` (and `data:`, and `file:` under one directory) are accepted;
2. the host must be on the domain allowlist;
3. the name is resolved once, and every address it resolves to must be a public one
   (loopback, private, link-local, multicast, reserved, unspecified and other
   non-global ranges are refused, including IPv4 hidden in IPv6 forms) unless the
   operator allowed that network explicitly;
4. we connect to the address we checked, sending the original Host header and TLS
   server name, so a second DNS answer (rebinding) cannot swap the target;
5. redirects are followed by hand, each hop going through 1-4 again, up to a bound.

Bytes and total wall time are capped. Every refusal raises `FetchError`, an
`ImageError`, whose message names the problem.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import httpx

from rtpllm.multimodal.image_input import ImageError, ImageLimits, parse_data_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class FetchError(ImageError):
    """An image URL we refuse or cannot fetch; the message says which and why."""


@dataclass(frozen=True)
class FetchPolicy:
    """What `ImageFetcher` may fetch.

    `allowed_domains`: hosts whose images may be fetched. `example.com` matches that host
    only; `*.example.com` matches its subdomains. Empty disables http(s) fetching.
    `allowed_networks`: CIDRs exempt from the non-public-address ban, for an internal
    image store (or 127.0.0.1/32 in tests). Empty by default: nothing internal is reachable.
    `file_root`: the directory `file:` URLs may read from (symlinks resolved); None
    disables `file:`.
    """

    allowed_domains: frozenset[str] = frozenset()
    allowed_networks: tuple[str, ...] = ()
    file_root: Path | None = None
    max_bytes: int = ImageLimits.max_bytes
    timeout_s: float = 10.0
    max_redirects: int = 3
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "allowed_domains", frozenset(_normalize_host(d) for d in self.allowed_domains)
        )
        object.__setattr__(
            self, "_networks", tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)
        )

    def domain_allowed(self, host: str) -> bool:
        if host in self.allowed_domains:
            return True
        return any(d.startswith("*.") and host.endswith(d[1:]) for d in self.allowed_domains)

    def address_problem(self, ip: IPAddress) -> str | None:
        """Why connecting to `ip` is refused ('loopback', 'private', ...), or None if allowed."""
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        if mapped is not None:
            ip = mapped  # ::ffff:a.b.c.d is a.b.c.d on the wire
        if any(ip in net for net in self._networks):
            return None
        for candidate in _embedded_addresses(ip):
            problem = _non_public_kind(candidate)
            if problem is not None:
                return problem
        return None


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host` (in its order)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class ImageFetcher:
    """Fetches image bytes from `data:`, `http(s):` and `file:` URLs under a `FetchPolicy`.

    Use as an async context manager, or call `aclose()`. The resolver is injectable so
    tests (and deployments with their own DNS) control what names resolve to;
    `ssl_context` replaces the default certificate verification (system CAs via certifi),
    e.g. to trust a private CA.
    """

    def __init__(
        self,
        policy: FetchPolicy,
        *,
        resolver: Resolver = system_resolver,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = policy
        self._resolver = resolver
        self._timeout = httpx.Timeout(policy.timeout_s).as_dict()
        # The bare transport, not a client: no proxy from the environment (a proxy would
        # resolve the name itself, bypassing the address check) and no redirect logic
        # (a client parses every Location, and chokes on ones we mean to refuse). No
        # keep-alive: a pooled TLS connection keyed by IP could otherwise serve a second
        # hostname whose certificate was never checked.
        self._transport = httpx.AsyncHTTPTransport(
            verify=ssl_context if ssl_context is not None else True,
            limits=httpx.Limits(max_keepalive_connections=0),
            retries=0,
        )

    async def __aenter__(self) -> ImageFetcher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def fetch(self, url: str) -> bytes:
        """The bytes behind `url`, or FetchError (ImageError for a bad `data:` URL)."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return parse_data_url(url, self.policy.max_bytes)[1]
        if scheme == "file":
            return await asyncio.to_thread(self._read_file, url)
        if scheme in ("http", "https"):
            try:
                async with asyncio.timeout(self.policy.timeout_s):
                    return await self._fetch_http(url)
            except TimeoutError as exc:
                raise FetchError(
                    f"fetching {url} timed out after {self.policy.timeout_s:g} s", "timeout"
                ) from exc
        shown = scheme or url[:32]
        raise FetchError(f"unsupported image URL scheme {shown!r}: use data:, http(s): or file:", "bad_url")

    async def _fetch_http(self, url: str) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            target = await self._checked_target(url)
            request = httpx.Request(
                "GET",
                target.connect_url,
                headers={
                    "Host": target.host_header,
                    "Accept": "image/*",
                    # Images are compressed already; a compressed body could inflate far
                    # past the byte cap inside a single decoded chunk.
                    "Accept-Encoding": "identity",
                    "User-Agent": "rtpllm-image-fetch",
                },
                extensions={"sni_hostname": target.host, "timeout": self._timeout},
            )
            try:
                response = await self._transport.handle_async_request(request)
            except httpx.HTTPError as exc:
                raise FetchError(f"cannot fetch {url}: {type(exc).__name__}: {exc}", "fetch_failed") from exc
            try:
                if response.status_code in _REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError(f"{url} redirected without a Location header", "fetch_failed")
                    url = urljoin(url, location)
                    continue
                return await self._read_body(url, response)
            finally:
                await response.aclose()
        raise FetchError(
            f"too many redirects (more than {self.policy.max_redirects}) fetching image", "redirects"
        )

    async def _checked_target(self, url: str) -> _Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchError(
                f"image URL scheme {parts.scheme!r} is not allowed here (only http and https)", "bad_url"
            )
        if parts.username is not None or parts.password is not None:
            raise FetchError("image URLs with credentials (user@host) are not accepted", "bad_url")
        try:
            raw_host = parts.hostname
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise FetchError(f"malformed image URL: {exc}", "bad_url") from exc
        if not raw_host:
            raise FetchError("image URL has no host", "bad_url")
        host = _normalize_host(raw_host)
        if not self.policy.domain_allowed(host):
            raise FetchError(f"image URL host {host!r} is not in the allowed domains", "domain_not_allowed")

        literal = _ip_or_none(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                addresses = [ipaddress.ip_address(a) for a in await self._resolver(host, port)]
            except (OSError, ValueError) as exc:
                raise FetchError(f"cannot resolve image host {host!r}: {exc}", "fetch_failed") from exc
            if not addresses:
                raise FetchError(f"image host {host!r} resolves to no address", "fetch_failed")
        # Every answer must pass, not just the first: which one a client library would
        # pick is not ours to predict, and mixed answers are themselves a red flag.
        for ip in addresses:
            problem = self.policy.address_problem(ip)
            if problem is not None:
                raise FetchError(
                    f"image host {host!r} resolves to {ip}, a {problem} address", "address_not_allowed"
                )
        return _Target(parts=parts, host=host, port=port, ip=addresses[0])

    async def _read_body(self, url: str, response: httpx.Response) -> bytes:
        if response.status_code != 200:
            raise FetchError(f"fetching {url} returned HTTP {response.status_code}", "fetch_failed")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchError(
                f"{url} sent a {encoding!r}-encoded body; only identity is accepted", "fetch_failed"
            )
        cap = self.policy.max_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise FetchError(f"image at {url} is {declared} bytes, over the limit of {cap}", "too_many_bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > cap:
                raise FetchError(f"image at {url} is over the limit of {cap} bytes", "too_many_bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _read_file(self, url: str) -> bytes:
        root = self.policy.file_root
        if root is None:
            raise FetchError("file: image URLs are disabled", "bad_url")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise FetchError(f"file: URL names a remote host {parts.netloc!r}", "bad_url")
        try:
            real_root = root.resolve(strict=True)
            # strict resolve follows every symlink, so a link pointing out of the root
            # is judged by where it lands.
            path = Path(unquote(parts.path)).resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise FetchError(f"image file not found: {unquote(parts.path)}", "file_not_found") from exc
        if not path.is_relative_to(real_root):
            raise FetchError("image file is outside the allowed directory", "file_not_allowed")
        try:
            # O_NOFOLLOW: if the last component became a symlink since resolve(), refuse.
            # O_NONBLOCK: a FIFO planted in the directory must not hang the open.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise FetchError(f"cannot open image file: {exc.strerror}", "file_not_found") from exc
        cap = self.policy.max_bytes
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise FetchError("image path is not a regular file", "file_not_allowed")
            if info.st_size > cap:
                raise FetchError(
                    f"image file is {info.st_size} bytes, over the limit of {cap}", "too_many_bytes"
                )
            chunks: list[bytes] = []
            size = 0
            while size <= cap and (chunk := os.read(fd, cap + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if size > cap:  # the file grew after fstat
            raise FetchError(f"image file is over the limit of {cap} bytes", "too_many_bytes")
        return b"".join(chunks)


@dataclass(frozen=True)
class _Target:
    """One checked hop: where to connect and what to tell the server we asked for."""

    parts: SplitResult
    host: str
    port: int
    ip: IPAddress

    @property
    def connect_url(self) -> str:
        ip = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        path = self.parts.path or "/"
        query = f"?{self.parts.query}" if self.parts.query else ""
        return f"{self.parts.scheme}://{ip}:{self.port}{path}{query}"

    @property
    def host_header(self) -> str:
        default = 443 if self.parts.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def _normalize_host(host: str) -> str:
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        # Compare internationalized names in their on-the-wire (punycode) form.
        host = host.encode("idna").decode("ascii")
    return host


def _ip_or_none(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _embedded_addresses(ip: IPAddress) -> list[IPAddress]:
    """Every IPv4 address an IPv6 form routes to (6to4, Teredo, NAT64), then `ip` itself."""
    out: list[IPAddress] = []
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.sixtofour is not None:
            out.append(ip.sixtofour)
        if ip.teredo is not None:
            out.extend(ip.teredo)
        if ip in _NAT64:
            out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    # Embedded IPv4 first: it names the real target ("loopback", not "reserved").
    return [*out, ip]


def _non_public_kind(ip: IPAddress) -> str | None:
    # Most specific first: loopback and link-local ranges are also 'private' to Python.
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:  # before private: Python counts 240.0.0.0/4 as both
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "non-public"
    return None
