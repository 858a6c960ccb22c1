"""`rtpllm secrets DIR`: the secrets of a docker compose stack, made once into a volume.

The compose file runs it as a one-shot service before anything else. It writes, each
readable by its owner only (the services read them as root in their containers):

- `nats_token`: the token every NATS client presents, and `nats.conf`, the
  nats-server config that demands it (nats-server reads no secret from its argv then);
- `redis_password`: Redis's `requirepass`, which the Redis clients put in their URL;
- `api_key`: the gateway's API key(s), one a line, for `--api-key-file`.

A secret already there is kept, so restarts (and `docker compose up` again) keep their
credentials and clients keep their key; `docker compose down -v` drops the volume and
with it every secret. An API key given with `--api-key` (RTPLLM_API_KEY) replaces the
stored one.
"""

from __future__ import annotations

import os
from pathlib import Path

from rtpllm.credentials import new_api_key, new_secret, read_secret_file, write_secret_file

NATS_TOKEN = "nats_token"
REDIS_PASSWORD = "redis_password"
API_KEY = "api_key"
NATS_CONFIG = "nats.conf"
NATS_MAX_PAYLOAD = 8 << 20  # bytes; NATS' default is 1 MiB


def _kept_or_new(path: Path, make: str) -> str:
    """'kept' if `path` holds a secret, else writes `make` there and says 'new'."""
    try:
        read_secret_file(path)
        return "kept"
    except (FileNotFoundError, ValueError):
        write_secret_file(path, make)
        return "new"


def ensure_secrets(directory: str | Path, api_keys: tuple[str, ...] = ()) -> dict[str, str]:
    """Make the missing secrets in `directory` (and `nats.conf` from the token); with
    `api_keys`, store those as the API keys. Returns what happened to each file."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    done = {
        NATS_TOKEN: _kept_or_new(root / NATS_TOKEN, new_secret()),
        REDIS_PASSWORD: _kept_or_new(root / REDIS_PASSWORD, new_secret()),
    }
    if api_keys:
        write_secret_file(root / API_KEY, "\n".join(api_keys))
        done[API_KEY] = "from --api-key"
    else:
        done[API_KEY] = _kept_or_new(root / API_KEY, new_api_key())
    token = read_secret_file(root / NATS_TOKEN)
    # Quoted: the config parser would read some bare strings as numbers or variables.
    config = (
        f"# Written by `rtpllm secrets`: clients must present the token in {NATS_TOKEN}.\n"
        f'authorization {{\n  token: "{token}"\n}}\n'
        # A chat request carries its images' encoded bytes (docs/multimodal.md).
        f"max_payload: {NATS_MAX_PAYLOAD}\n"
    )
    write_secret_file(root / NATS_CONFIG, config)
    done[NATS_CONFIG] = "written"
    return done


def main(directory: str, api_key: str | None) -> int:
    from rtpllm.api.auth import load_api_keys

    try:
        keys = load_api_keys(api_key, None)
        done = ensure_secrets(directory, keys)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 1
    print(f"secrets in {directory}: " + ", ".join(f"{name} ({what})" for name, what in done.items()))
    return 0
