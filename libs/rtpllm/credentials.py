"""Secrets of a deployment (NATS token, Redis password, API keys): making them, keeping
them in files only their owner can read, and keeping them out of URLs that get logged.

No rtpllm imports: the bus helper, the Redis tier, the process supervisor and the command
line all use it.
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

API_KEY_PREFIX = "rtpllm-"  # recognisable in a leaked config or log, as OpenAI's "sk-"


def new_secret(nbytes: int = 32) -> str:
    """A random secret, URL- and config-safe ([A-Za-z0-9_-]), so it can sit in a URL's
    userinfo, a header or a server config without quoting. It starts with a letter: the
    nats-server config parser reads an unquoted value that starts with a digit or `-` as
    a number (and fails on the rest), which made one start in six fail."""
    return secrets.choice(string.ascii_letters) + secrets.token_urlsafe(nbytes)


def new_api_key() -> str:
    return API_KEY_PREFIX + new_secret(24)


def read_secret_file(path: str | Path) -> str:
    """The secret in `path` (surrounding whitespace, such as the final newline, removed);
    ValueError if the file is empty: an empty secret would mean "no authentication"."""
    value = Path(path).expanduser().read_text().strip()
    if not value:
        raise ValueError(f"{path} is empty")
    return value


def write_secret_file(path: str | Path, value: str) -> Path:
    """Write `value` to `path` readable by its owner only (0600), atomically: the file is
    created 0600 before the secret is in it, then renamed into place."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when the file was left behind with other bits
        os.write(fd, (value + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without its userinfo, user, password), both percent-decoded; (url, None,
    None) when it has none. `nats://tok@host` gives user "tok" and no password (a token)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    bare = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return bare, unquote(user) if user else None, unquote(password) if sep else None


def with_userinfo(url: str, user: str | None, password: str | None) -> str:
    """`url` with this user and password (either may be None), percent-encoded; any
    userinfo it had is replaced."""
    bare, _, _ = split_userinfo(url)
    if user is None and password is None:
        return bare
    parts = urlsplit(bare)
    userinfo = quote(user or "", safe="")
    if password is not None:
        userinfo += ":" + quote(password, safe="")
    return urlunsplit((parts.scheme, f"{userinfo}@{parts.netloc}", parts.path, parts.query, parts.fragment))


def redact_url(url: str) -> str:
    """`url` fit for a log line: a password, or a token standing alone as the user, is
    replaced by `***`; a user name with a password is kept (it is no secret)."""
    bare, user, password = split_userinfo(url)
    if user is None and password is None:
        return url
    parts = urlsplit(bare)
    shown = "***" if password is None else f"{quote(user or '', safe='')}:***"
    return urlunsplit((parts.scheme, f"{shown}@{parts.netloc}", parts.path, parts.query, parts.fragment))
