"""Image URL fetching against a real HTTP server on 127.0.0.1: the allowlist, the address
ban (through names our test resolver maps), redirects re-checked per hop, byte and time
caps, and file: URLs confined to one directory."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rtpllm.multimodal.fetch import FetchError, FetchPolicy, ImageFetcher
from rtpllm.multimodal.image_input import ImageError

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # bytes are bytes to the fetcher


@dataclass
class ImageServer:
    """A tiny HTTP/1.1 server; `routes` maps a path to (status, headers, body or delay)."""

    port: int = 0
    hosts_seen: list[str] = field(default_factory=list)
    paths_seen: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            self.hosts_seen.append(headers.get("host", ""))
            self.paths_seen.append(path)
            await self.respond(path, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def respond(self, path: str, writer: asyncio.StreamWriter) -> None:
        def send(status: str, headers: dict[str, str], body: bytes = b"") -> None:
            lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close"]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

        route, _, arg = path.partition("?to=")
        if route == "/image.png":
            send("200 OK", {"Content-Length": str(len(IMAGE)), "Content-Type": "image/png"}, IMAGE)
        elif route == "/redirect":
            send("302 Found", {"Location": arg, "Content-Length": "0"})
        elif route.startswith("/chain/"):
            hops = int(route.rsplit("/", 1)[1])
            target = "/image.png" if hops == 0 else f"/chain/{hops - 1}"
            send("301 Moved", {"Location": target, "Content-Length": "0"})
        elif route == "/big-declared":
            send("200 OK", {"Content-Length": "10000000"}, b"x" * 1000)
        elif route == "/big-streamed":
            send("200 OK", {}, b"")  # no length: read until close
            for _ in range(100):
                writer.write(b"x" * 10_000)
                await writer.drain()
        elif route == "/slow":
            send("200 OK", {"Content-Length": "100"}, b"x" * 10)
            await writer.drain()
            await asyncio.sleep(5)
        elif route == "/gzip":
            send("200 OK", {"Content-Length": "4", "Content-Encoding": "gzip"}, b"abcd")
        else:
            send("404 Not Found", {"Content-Length": "0"})
        await writer.drain()


@pytest.fixture
async def server() -> AsyncIterator[ImageServer]:
    async for srv in _serve(None):
        yield srv


async def _serve(tls: ssl.SSLContext | None) -> AsyncIterator[ImageServer]:
    srv = ImageServer()
    tcp = await asyncio.start_server(srv.handle, "127.0.0.1", 0, ssl=tls)
    srv.port = tcp.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        tcp.close()
        await tcp.wait_closed()


# Names the test resolver knows. `images.test` is the allowed image host (our server);
# the others are allowed domains that point somewhere internal. The system resolver
# knows none of them, so a successful fetch also proves we connect to the IP we checked.
DNS = {
    "images.test": ["127.0.0.1"],
    "private.test": ["10.1.2.3"],
    "metadata.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "mixed.test": ["127.0.0.1", "192.168.0.10"],
    "v6-loopback.test": ["::1"],
    "nat64.test": ["64:ff9b::a00:1"],
}


class Resolver:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in DNS:
            raise OSError(f"unknown host {host}")
        return DNS[host]


def policy(**overrides: object) -> FetchPolicy:
    base: dict[str, object] = {
        "allowed_domains": frozenset(DNS) | {"127.0.0.1"},
        # The explicit opt-in for our loopback test server; nothing else internal.
        "allowed_networks": ("127.0.0.1/32",),
        "max_bytes": 50_000,
        "timeout_s": 2.0,
        "max_redirects": 3,
    }
    base.update(overrides)
    return FetchPolicy(**base)  # type: ignore[arg-type]


async def fetch(url: str, pol: FetchPolicy | None = None, resolver: Resolver | None = None) -> bytes:
    async with ImageFetcher(pol or policy(), resolver=resolver or Resolver()) as fetcher:
        return await fetcher.fetch(url)


async def test_fetches_from_an_allowed_host_connecting_to_the_checked_ip(server: ImageServer) -> None:
    resolver = Resolver()
    assert await fetch(f"http://images.test:{server.port}/image.png", resolver=resolver) == IMAGE
    assert resolver.calls == ["images.test"]  # resolved once, by us
    assert server.hosts_seen == [f"images.test:{server.port}"]  # the original Host header


async def test_ip_literal_host_skips_dns(server: ImageServer) -> None:
    resolver = Resolver()
    assert await fetch(f"http://127.0.0.1:{server.port}/image.png", resolver=resolver) == IMAGE
    assert resolver.calls == []


@pytest.mark.parametrize(
    ("url", "message", "code"),
    [
        (
            "http://evil.example/image.png",
            "host 'evil.example' is not in the allowed domains",
            "domain_not_allowed",
        ),
        ("http://private.test/x.png", "resolves to 10.1.2.3, a private address", "address_not_allowed"),
        ("http://metadata.test/", "resolves to 169.254.169.254, a link-local address", "address_not_allowed"),
        ("http://mixed.test/x.png", "resolves to 192.168.0.10, a private address", "address_not_allowed"),
        ("http://v6-loopback.test/x.png", "resolves to ::1, a loopback address", "address_not_allowed"),
        ("http://nat64.test/x.png", "resolves to 64:ff9b::a00:1, a private address", "address_not_allowed"),
        ("http://nowhere.test/x.png", "cannot resolve image host 'nowhere.test'", "fetch_failed"),
        ("http://user:pw@images.test/x.png", "credentials", "bad_url"),
        ("ftp://images.test/x.png", "unsupported image URL scheme 'ftp'", "bad_url"),
        ("gopher://images.test/", "unsupported image URL scheme 'gopher'", "bad_url"),
    ],
)
async def test_refusals_name_the_problem(url: str, message: str, code: str) -> None:
    pol = policy(allowed_domains=frozenset(DNS) | {"nowhere.test"})
    with pytest.raises(FetchError, match=message) as exc:
        await fetch(url, pol)
    assert exc.value.reason == code


async def test_loopback_is_refused_unless_its_network_is_allowed(server: ImageServer) -> None:
    url = f"http://images.test:{server.port}/image.png"
    with pytest.raises(FetchError, match="resolves to 127.0.0.1, a loopback address"):
        await fetch(url, policy(allowed_networks=()))
    # IPv4-mapped IPv6 is the same address: refused, and allowed by the same opt-in.
    with pytest.raises(FetchError, match="resolves to ::ffff:7f00:1, a loopback address"):
        await fetch(f"http://mapped.test:{server.port}/image.png", policy(allowed_networks=()))
    assert server.paths_seen == []  # refused before connecting


def test_address_classification() -> None:
    pol = FetchPolicy()
    cases = {
        "8.8.8.8": None,
        "2606:4700:4700::1111": None,
        "127.0.0.2": "loopback",
        "0.0.0.0": "unspecified",
        "::": "unspecified",
        "10.0.0.1": "private",
        "172.16.5.4": "private",
        "192.168.1.1": "private",
        "fc00::1": "private",
        "169.254.169.254": "link-local",
        "fe80::1": "link-local",
        "224.0.0.1": "multicast",
        "ff02::1": "multicast",
        "240.0.0.1": "reserved",
        "100.64.0.1": "non-public",
        "::ffff:10.0.0.1": "private",
        "::ffff:8.8.8.8": None,
        "2002:7f00:1::": "loopback",  # 6to4 wrapping 127.0.0.1
        "64:ff9b::7f00:1": "loopback",  # NAT64 wrapping 127.0.0.1
    }
    got = {a: pol.address_problem(ipaddress.ip_address(a)) for a in cases}
    assert got == cases


def test_domain_matching() -> None:
    pol = FetchPolicy(allowed_domains=frozenset({"Images.Example.com.", "*.cdn.example"}))
    assert pol.domain_allowed("images.example.com")
    assert not pol.domain_allowed("example.com")
    assert not pol.domain_allowed("evilimages.example.com")
    assert pol.domain_allowed("a.cdn.example") and pol.domain_allowed("a.b.cdn.example")
    assert not pol.domain_allowed("cdn.example") and not pol.domain_allowed("evilcdn.example")


async def test_redirects_are_followed_and_rechecked(server: ImageServer) -> None:
    base = f"http://images.test:{server.port}"
    assert await fetch(f"{base}/chain/2") == IMAGE
    with pytest.raises(FetchError, match="too many redirects") as exc:
        await fetch(f"{base}/chain/5")
    assert exc.value.reason == "redirects"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("http://private.test/x.png", "resolves to 10.1.2.3, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254' is not in the allowed domains"),
        ("http://evil.example/x.png", "'evil.example' is not in the allowed domains"),
        ("file:///etc/passwd", "scheme 'file' is not allowed here"),
        ("data:image/png;base64,AAAA", "scheme 'data' is not allowed here"),
    ],
)
async def test_redirect_to_a_forbidden_target_is_refused(
    server: ImageServer, target: str, message: str
) -> None:
    with pytest.raises(FetchError, match=message):
        await fetch(f"http://images.test:{server.port}/redirect?to={target}")


async def test_redirect_to_a_private_address_even_on_an_allowed_domain(server: ImageServer) -> None:
    pol = policy(allowed_domains=frozenset(DNS) | {"10.9.8.7"})
    with pytest.raises(FetchError, match="resolves to 10.9.8.7, a private address"):
        await fetch(f"http://images.test:{server.port}/redirect?to=http://10.9.8.7/x", pol)


async def test_byte_cap_on_declared_and_streamed_bodies(server: ImageServer) -> None:
    base = f"http://images.test:{server.port}"
    with pytest.raises(FetchError, match="10000000 bytes, over the limit of 50000") as exc:
        await fetch(f"{base}/big-declared")
    assert exc.value.reason == "too_many_bytes"
    with pytest.raises(FetchError, match="over the limit of 50000 bytes"):
        await fetch(f"{base}/big-streamed")


async def test_total_time_cap(server: ImageServer) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(FetchError, match="timed out after 0.5 s") as exc:
        await fetch(f"http://images.test:{server.port}/slow", policy(timeout_s=0.5))
    assert exc.value.reason == "timeout"
    assert loop.time() - start < 2.0


async def test_http_errors_and_encodings(server: ImageServer) -> None:
    base = f"http://images.test:{server.port}"
    with pytest.raises(FetchError, match="returned HTTP 404"):
        await fetch(f"{base}/missing.png")
    with pytest.raises(FetchError, match="'gzip'-encoded body"):
        await fetch(f"{base}/gzip")


async def test_http_disabled_without_an_allowlist(server: ImageServer) -> None:
    with pytest.raises(FetchError, match="not in the allowed domains"):
        await fetch(
            f"http://127.0.0.1:{server.port}/image.png", FetchPolicy(allowed_networks=("127.0.0.1/32",))
        )


async def test_data_urls_pass_through_with_their_own_errors() -> None:
    assert await fetch("data:image/png;base64,AQID") == b"\x01\x02\x03"
    with pytest.raises(ImageError, match="not valid base64"):
        await fetch("data:image/png;base64,A$")


async def test_file_urls_only_under_the_allowed_directory(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (root / "cat.png").write_bytes(IMAGE)
    (root / "sub").mkdir()
    (root / "sub" / "dog one.png").write_bytes(b"dog")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    (root / "escape.png").symlink_to(tmp_path / "secret.txt")
    (root / "inner.png").symlink_to(root / "cat.png")
    (root / "big.png").write_bytes(b"x" * 60_000)
    pol = policy(file_root=root)

    assert await fetch(f"file://{root}/cat.png", pol) == IMAGE
    assert await fetch(f"file://localhost{root}/sub/dog%20one.png", pol) == b"dog"
    assert await fetch(f"file://{root}/inner.png", pol) == IMAGE  # a link that stays inside

    refusals = {
        f"file://{root}/../secret.txt": "outside the allowed directory",
        f"file://{root}/escape.png": "outside the allowed directory",
        f"file://{root}/sub": "not a regular file",
        f"file://{root}/missing.png": "image file not found",
        f"file://{root}/big.png": "60000 bytes, over the limit of 50000",
        f"file://otherhost{root}/cat.png": "remote host 'otherhost'",
    }
    for url, message in refusals.items():
        with pytest.raises(FetchError, match=message):
            await fetch(url, pol)
    with pytest.raises(FetchError, match="file: image URLs are disabled"):
        await fetch(f"file://{root}/cat.png", policy())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for images.test (made with the openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=images.test"]
        + ["-addext", "subjectAltName=DNS:images.test"],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_connects_to_the_checked_ip_and_verifies_the_hostname(
    certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))
    async for srv in _serve(server_tls):
        async with ImageFetcher(policy(), resolver=Resolver(), ssl_context=client_tls) as fetcher:
            # The TCP connection goes to 127.0.0.1, yet the certificate is checked
            # against the name in the URL (SNI + hostname verification).
            assert await fetcher.fetch(f"https://images.test:{srv.port}/image.png") == IMAGE
            # The same server reached under a name its certificate does not cover.
            with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED|certificate") as exc:
                await fetcher.fetch(f"https://127.0.0.1:{srv.port}/image.png")
            assert exc.value.reason == "fetch_failed"
        assert srv.hosts_seen[0] == f"images.test:{srv.port}"
