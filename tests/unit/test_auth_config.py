"""Authentication without processes: API keys and the gateway's middleware, NATS
connection configs (credentials and TLS from flags and URLs), secrets in URLs and files,
the flags that carry them, `rtpllm up`'s API key and `rtpllm secrets`. The real servers
refusing strangers: tests/integration/test_auth.py."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from rtpllm.api.auth import APIKeyMiddleware, APIKeys, load_api_keys, open_paths
from rtpllm.cli import build_parser
from rtpllm.cli.secrets import ensure_secrets
from rtpllm.cli.serve import gateway_settings, kvstore_settings, worker_settings
from rtpllm.credentials import read_secret_file, redact_url, split_userinfo, with_userinfo, write_secret_file
from rtpllm.serving.bus import NatsConfig

# -- API keys ---------------------------------------------------------------------------


def test_api_keys_from_flag_and_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team A\nkey-a\n\n  key-b  \nkey-c\n")
    assert load_api_keys("key-c, key-d,", keys) == ("key-c", "key-d", "key-a", "key-b")
    assert load_api_keys(None, None) == () and load_api_keys("", None) == ()
    keys.write_text("# nothing but comments\n\n")
    with pytest.raises(ValueError, match="holds no key"):  # meant to be protected: never comes up open
        load_api_keys(None, keys)
    with pytest.raises(ValueError, match="printable ASCII"):
        load_api_keys("bad key", None)
    with pytest.raises(ValueError, match="printable ASCII"):
        load_api_keys("clé", None)


def test_key_check_is_exact() -> None:
    keys = APIKeys(["alpha-1", "beta-2"])
    assert keys.valid("alpha-1") and keys.valid("beta-2")
    assert not any(keys.valid(k) for k in ("alpha-", "alpha-11", "ALPHA-1", "", "beta-2 "))
    assert not APIKeys([]) and len(keys) == 2


def _app(keys: list[str], protect_metrics: bool = True) -> Starlette:
    async def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    paths = ["/v1/models", "/v1/chat/completions", "/health", "/ready", "/metrics", "/instances", "/debug/x"]
    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in paths])
    app.add_middleware(APIKeyMiddleware, keys=APIKeys(keys), open_paths=open_paths(protect_metrics))
    return app


async def _get(app: Starlette, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.get(path, headers=headers)


async def test_middleware_401_in_openai_format() -> None:
    app = _app(["k1", "k2"])
    missing = await _get(app, "/v1/models")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    error = missing.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (
        error["type"] == "invalid_request_error"
        and error["code"] == "invalid_api_key"
        and error["param"] is None
    )
    assert "didn't provide an API key" in error["message"]
    wrong = await _get(app, "/v1/models", {"Authorization": "Bearer k3"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "Incorrect API key provided."
    assert "k3" not in wrong.text  # never echoed
    for header in ("Basic k1", "k1", "Bearer ", "Bearer"):
        assert (await _get(app, "/v1/models", {"Authorization": header})).status_code == 401, header
    for key in ("k1", "k2"):
        assert (await _get(app, "/v1/models", {"Authorization": f"Bearer {key}"})).status_code == 200
    assert (
        await _get(app, "/v1/models", {"Authorization": "bearer  k2 "})
    ).status_code == 200  # scheme is case-insensitive


async def test_open_and_protected_paths() -> None:
    protected = _app(["k"])
    for path in ("/health", "/ready"):
        assert (await _get(protected, path)).status_code == 200, path
    for path in ("/metrics", "/instances", "/debug/x", "/v1/chat/completions", "/nope"):
        assert (await _get(protected, path)).status_code == 401, path
    metrics_open = _app(["k"], protect_metrics=False)
    for path in ("/metrics", "/instances", "/health"):
        assert (await _get(metrics_open, path)).status_code == 200, path
    assert (await _get(metrics_open, "/v1/models")).status_code == 401
    no_keys = _app([])  # no key configured: open
    assert (await _get(no_keys, "/v1/models")).status_code == 200


# -- secrets in URLs and files ------------------------------------------------------------


def test_credentials_in_urls() -> None:
    assert split_userinfo("redis://:p%40ss@r:6379/0") == ("redis://r:6379/0", None, "p@ss")
    assert split_userinfo("nats://tok@n:4222") == ("nats://n:4222", "tok", None)
    assert split_userinfo("nats://n:4222") == ("nats://n:4222", None, None)
    assert with_userinfo("redis://old:x@r:6379/0", None, "p@ss:w") == "redis://:p%40ss%3Aw@r:6379/0"
    assert redact_url("redis://:secret@r:6379/0") == "redis://:***@r:6379/0"
    assert redact_url("nats://secret@n:4222") == "nats://***@n:4222"
    assert redact_url("nats://alice:secret@n:4222") == "nats://alice:***@n:4222"
    assert redact_url("nats://n:4222") == "nats://n:4222"


def test_secret_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "token"
    write_secret_file(path, "s3cret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and read_secret_file(path) == "s3cret"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_secret_file(path)


# -- NATS connection configs --------------------------------------------------------------


def test_nats_credentials_from_url_or_fields() -> None:
    assert NatsConfig("nats://tok%2Fx@n:4222").options() == {"token": "tok/x"}
    assert NatsConfig("nats://alice:pw@n:4222").options() == {"user": "alice", "password": "pw"}
    # Explicit fields win over the URL's; nats-py never sees credentials in a URL.
    config = NatsConfig("nats://old@a:4222, nats://b:4222", token="new")
    assert config.servers == ["nats://a:4222", "nats://b:4222"] and config.options() == {"token": "new"}
    assert NatsConfig("nats://n:4222").options() == {} and NatsConfig().auth_kind == "none"
    with pytest.raises(ValueError, match="not both"):
        NatsConfig(token="t", user="u")
    with pytest.raises(ValueError, match="both"):
        NatsConfig(tls_cert="/c.pem")


def test_nats_config_as_one_url_and_back() -> None:
    """The kvstore client gets a string: everything must survive the trip."""
    config = NatsConfig(
        "nats://a:4222,nats://b:4222", user="u", password="p@ss w", tls_ca="/etc/ca dir/ca.pem"
    )
    again = NatsConfig.from_url(config.as_url())
    assert again.servers == config.servers and again.credentials() == (None, "u", "p@ss w")
    assert again.tls_ca == "/etc/ca dir/ca.pem" and again.tls
    assert NatsConfig.from_url(NatsConfig(token="t").as_url()).credentials() == ("t", None, None)
    assert NatsConfig("nats://n:4222").as_url() == "nats://n:4222"


def test_nats_config_never_shows_secrets() -> None:
    config = NatsConfig("nats://url-secret@n:4222", tls_ca="/ca.pem")
    text = repr(config) + config.display
    assert "url-secret" not in text and "auth='token'" in text
    assert "pw-secret" not in repr(NatsConfig(user="u", password="pw-secret"))


def test_nats_tls_context(tmp_path: Path) -> None:
    assert NatsConfig().ssl_context() is None
    context = NatsConfig("tls://n:4222").ssl_context()  # the system's CAs
    assert context is not None and context.check_hostname
    with pytest.raises(OSError):  # a CA file that is not there is an error, never a silent default
        NatsConfig(tls_ca=str(tmp_path / "missing.pem")).ssl_context()


# -- flags ----------------------------------------------------------------------------------


def test_bus_credentials_from_flags_env_and_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token, password = tmp_path / "token", tmp_path / "password"
    write_secret_file(token, "tok-1")
    write_secret_file(password, "pw/1")
    monkeypatch.setenv("RTPLLM_NATS_TOKEN_FILE", str(token))
    monkeypatch.setenv("RTPLLM_REDIS_PASSWORD_FILE", str(password))
    args = build_parser().parse_args(
        [
            "serve",
            "worker",
            "--device",
            "cpu",
            "--nats",
            "nats://n:1",
            "--redis",
            "redis://r:6379/0",
            "--kvstore",
            "--kv-redis",
        ]
    )
    w = worker_settings(args)
    assert w.nats.options() == {"token": "tok-1"} and w.redis_url == "redis://:pw%2F1@r:6379/0"
    # The engine's kvstore client gets one string with the token in it; no repr shows it.
    assert w.engine.offload.kvstore_nats_url == "nats://tok-1@n:1" and "tok-1" not in repr(w)
    assert w.engine.offload.redis_url == w.redis_url
    k = kvstore_settings(
        build_parser().parse_args(
            ["serve", "kvstore", "--redis", "redis://r:6379/0", "--kv-redis", "--nats-token", "tok-2"]
        )
    )
    assert k.nats.credentials() == ("tok-2", None, None) and k.redis_url == "redis://:pw%2F1@r:6379/0"
    monkeypatch.setenv("RTPLLM_NATS_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="--nats-token-file"):
        worker_settings(build_parser().parse_args(["serve", "worker", "--device", "cpu"]))


def test_gateway_api_key_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("from-file\n")
    s = gateway_settings(
        build_parser().parse_args(["serve", "gateway", "--api-key", "a,b", "--api-key-file", str(keys)])
    )
    assert s.api_keys == ("a", "b", "from-file") and s.protect_metrics and "from-file" not in repr(s)
    monkeypatch.setenv("RTPLLM_API_KEY", "env-key")
    monkeypatch.setenv("RTPLLM_PROTECT_METRICS", "0")
    s = gateway_settings(build_parser().parse_args(["serve", "gateway"]))
    assert s.api_keys == ("env-key",) and not s.protect_metrics
    keys.write_text("")
    with pytest.raises(SystemExit, match="holds no key"):
        gateway_settings(build_parser().parse_args(["serve", "gateway", "--api-key-file", str(keys)]))


def test_up_makes_its_api_key_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rtpllm.cli.up import gateway_api_keys

    monkeypatch.setenv("RTPLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RTPLLM_API_KEY", raising=False)
    monkeypatch.delenv("RTPLLM_API_KEY_FILE", raising=False)
    (key,), source = gateway_api_keys(build_parser().parse_args(["up"]))
    path = tmp_path / "api_key"
    assert key.startswith("rtpllm-") and source.endswith("new") and read_secret_file(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert gateway_api_keys(build_parser().parse_args(["up"])) == (
        (key,),
        str(path),
    )  # the next `up` keeps it
    assert gateway_api_keys(build_parser().parse_args(["up", "--api-key", "mine"])) == (
        ("mine",),
        "--api-key",
    )
    assert gateway_api_keys(build_parser().parse_args(["up", "--no-auth"])) == ((), "off")


def test_secrets_are_made_once(tmp_path: Path) -> None:
    root = tmp_path / "secrets"
    first = ensure_secrets(root)
    assert first == {"nats_token": "new", "redis_password": "new", "api_key": "new", "nats.conf": "written"}
    values = {name: read_secret_file(root / name) for name in ("nats_token", "redis_password", "api_key")}
    assert len(set(values.values())) == 3
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in root.iterdir())
    assert f'token: "{values["nats_token"]}"' in (root / "nats.conf").read_text()
    again = ensure_secrets(root)
    assert again["nats_token"] == again["redis_password"] == again["api_key"] == "kept"
    assert {name: read_secret_file(root / name) for name in values} == values
    ensure_secrets(root, ("user-key",))  # RTPLLM_API_KEY replaces the stored key
    assert read_secret_file(root / "api_key") == "user-key"


def test_generated_secrets_start_with_a_letter() -> None:
    """nats-server reads an unquoted config value starting with a digit or '-' as a
    number; a generated token must never do that (it failed one stack start in six)."""
    from rtpllm.credentials import new_secret

    for _ in range(500):
        secret = new_secret()
        assert secret[0].isalpha() and len(secret) > 40
        assert all(c.isalnum() or c in "-_" for c in secret)
