"""Issue 14, authentication, with real processes: a stack as `rtpllm up` starts it
(authenticated by default) lets nobody in without credentials.

- HTTP: no key or a wrong key gets 401 in OpenAI's format, the right key gets answers;
  /health and /ready stay open, /metrics and /instances need the key (unless
  --no-protect-metrics).
- NATS: the stack's nats-server refuses a client without its token, or with a wrong one;
  `connect_nats` says so at once instead of retrying for its whole timeout.
- Redis: the stack's redis-server refuses a client without its password.
- No secret is on any process's command line (what `ps` shows every user).
- TLS to an external NATS: a private CA and a client certificate work (for the heartbeat
  thread's second connection and the kvstore client's one-string form too); a server the
  CA does not vouch for is refused at once, and so is a plain server when TLS was asked.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import nats.errors
import openai
import pytest
import redis

from rtpllm.credentials import split_userinfo
from rtpllm.runtime.processes import ManagedProcess, free_port, nats_server_binary, port_open, wait_until
from rtpllm.runtime.stack import Stack
from rtpllm.serving.bus import NatsConfig, connect_like, connect_nats
from tests.integration.support import MODEL_NAME, Endpoint, ExtraGateway, client_for, get, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def secured(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tiny_model, tmp_path_factory.mktemp("auth-stack-logs"), workers=1) as stack:
        yield stack


def test_the_stack_is_authenticated_by_default(secured: Stack) -> None:
    assert secured.config.auth and secured.api_key and secured.nats_token and secured.redis_password
    assert secured.api_key.startswith("rtpllm-")


def test_http_needs_the_api_key(secured: Stack) -> None:
    body = {"model": MODEL_NAME, "messages": MSG, "max_tokens": 2}
    no_key = httpx.post(f"{secured.url}/v1/chat/completions", json=body)
    assert no_key.status_code == 401 and no_key.headers["www-authenticate"] == "Bearer"
    error = no_key.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        None,
        "invalid_api_key",
    )
    wrong = httpx.post(
        f"{secured.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {secured.api_key}x"},
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert (
        httpx.post(
            f"{secured.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {secured.api_key}"},
        ).status_code
        == 200
    )
    # The official client sends its api_key as the bearer token.
    reply = client_for(secured).chat.completions.create(model=MODEL_NAME, messages=MSG, max_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        client_for(Endpoint(secured.url, "not-the-key")).models.list()
    with pytest.raises(openai.AuthenticationError):
        client_for(Endpoint(secured.url, None)).models.list()


def test_health_and_ready_stay_open_metrics_and_instances_do_not(secured: Stack) -> None:
    stranger = Endpoint(secured.url, None)
    assert get(stranger, "/health").status_code == 200
    assert get(stranger, "/ready").status_code == 200  # container healthchecks have no key
    for path in ("/metrics", "/instances", "/v1/models"):
        assert get(stranger, path).status_code == 401, path
        assert get(secured, path).status_code == 200, path


def test_no_protect_metrics_opens_only_metrics_and_instances(secured: Stack, tmp_path: Path) -> None:
    gateway = ExtraGateway(secured, ["--no-protect-metrics"], tmp_path, "gw-open-metrics")
    try:
        gateway.wait_up()
        stranger = Endpoint(gateway.url, None)
        assert get(stranger, "/metrics").status_code == 200
        assert get(stranger, "/instances").status_code == 200
        assert get(stranger, "/v1/models").status_code == 401
        assert get(gateway, "/v1/models").status_code == 200
    finally:
        gateway.stop()


def test_nats_refuses_a_client_without_the_token(secured: Stack) -> None:
    bare, token, _ = split_userinfo(secured.nats_url)
    assert token == secured.nats_token

    async def attempt(url: str) -> str:
        try:
            nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0)
        except nats.errors.Error as exc:
            return str(exc)
        await nc.close()
        return "connected"

    async def check() -> None:
        assert "Authorization Violation" in await attempt(bare)
        assert "Authorization Violation" in await attempt(bare.replace("nats://", "nats://wrong-token@"))
        assert await attempt(secured.nats_url) == "connected"
        # The services' helper gives up at once on a refusal, with a clear error.
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="refused"):
            await connect_nats(bare, "intruder", wait_s=20)
        assert time.monotonic() - t0 < 5
        nc = await connect_nats(secured.nats_url, "friend", wait_s=5)
        await nc.close()

    asyncio.run(check())


def test_redis_refuses_a_client_without_the_password(secured: Stack) -> None:
    assert secured.redis_url is not None
    bare, _, password = split_userinfo(secured.redis_url)
    assert password == secured.redis_password
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(bare, socket_timeout=2).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(bare.replace("redis://", "redis://:wrong@"), socket_timeout=2).set("k", "v")
    assert redis.Redis.from_url(secured.redis_url, socket_timeout=2).ping()


def test_no_secret_on_a_command_line(secured: Stack) -> None:
    secrets = [s for s in (secured.nats_token, secured.redis_password, *secured.api_keys) if s]
    procs = [p for p in (secured.nats, secured.redis, secured.gateway, *secured.workers) if p is not None]
    for proc in procs:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(s in cmdline for s in secrets), f"{proc.name}: a secret on its command line"


# -- TLS to an external NATS -------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificates(root: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, signed by it."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=rtpllm-test-ca",
        cwd=root,
    )
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        (root / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=root
        )
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=root,
        )  # fmt: skip


@pytest.fixture(scope="module")
def tls_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A nats-server that requires TLS with client certificates, and a token."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    root = tmp_path_factory.mktemp("nats-tls")
    _certificates(root)
    port = free_port()
    (root / "nats.conf").write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'tls {{\n  cert_file: "{root}/server.pem"\n  key_file: "{root}/server.key"\n'
        f'  ca_file: "{root}/ca.pem"\n  verify: true\n}}\n'
        'authorization {\n  token: "tls-token"\n}\n'
    )
    proc = ManagedProcess(
        "nats-tls", [nats_server_binary(), "-c", str(root / "nats.conf")], log_path=root / "nats.log"
    ).start()
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 10, "the TLS nats-server", [proc])
        yield f"nats://127.0.0.1:{port}", root
    finally:
        proc.stop(5)


def test_nats_tls_with_a_private_ca_and_a_client_certificate(tls_nats: tuple[str, Path]) -> None:
    url, root = tls_nats
    tls = {
        "tls_ca": str(root / "ca.pem"),
        "tls_cert": str(root / "client.pem"),
        "tls_key": str(root / "client.key"),
    }

    async def check() -> None:
        nc = await connect_nats(NatsConfig(url, token="tls-token", **tls), "tls-client", wait_s=10)
        assert nc.is_connected and nc.options["tls"] is not None
        # A second connection like it (the heartbeat thread's) gets the same TLS and token.
        twin = await connect_like(nc, "tls-twin")
        assert twin.is_connected
        await twin.close()
        await nc.close()
        # The one-string form the engines' kvstore client gets works the same.
        nc = await connect_nats(
            NatsConfig(url, token="tls-token", **tls).as_url(), "tls-kvstore-client", wait_s=10
        )
        await nc.close()
        # The system's CAs do not know this server: refused at once, not retried.
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="refused"):
            await connect_nats(
                NatsConfig(url.replace("nats://", "tls://"), token="tls-token"), "no-ca", wait_s=20
            )
        assert time.monotonic() - t0 < 5
        with pytest.raises(ConnectionError, match="refused"):
            await connect_nats(NatsConfig(url, token="wrong", **tls), "wrong-token", wait_s=20)

    asyncio.run(check())


def test_tls_configured_against_a_plain_server_is_refused(secured: Stack, tls_nats: tuple[str, Path]) -> None:
    _, root = tls_nats

    async def check() -> None:
        with pytest.raises(ConnectionError, match="does not use TLS"):
            await connect_nats(
                NatsConfig(secured.nats_url, tls_ca=str(root / "ca.pem")), "downgraded", wait_s=10
            )

    asyncio.run(check())
