"""`rtpllm up` runs the compose topology: nats, redis, the host's kvstore, prefill and
decode instances and the gateway, with the kvstore on by default. A prompt computed on
one decode instance is restored from the kvstore on the other, not recomputed. The real
CLI, as a user starts it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rtpllm.credentials import read_secret_file
from rtpllm.runtime.processes import free_port
from tests.integration.support import Endpoint, ask, client_for, dump_logs, get, stop_up, wait_until_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROMPT = [(29 * i + 7) % 300 for i in range(160)]  # 10 full blocks of 16, under --local-prefill-below


def test_up_defaults_share_a_prefix_through_the_kvstore(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    # No kvstore flag: it is the default. Round-robin sends the repeat to the other decode.
    argv = [
        sys.executable, "-m", "rtpllm.cli", "up", "--model", str(tiny_model), "--port", str(port),
        "--decode", "2", "--router", "round-robin", "--no-redis-server", "--log-dir", str(tmp_path),
        "--kv-host-gib", "0.05", "--block-size", "16", "--num-blocks", "1024",
        # A loaded CI machine must not turn the kvstore hit into a timed-out miss.
        "--kv-tier-wait-min", "5", "--kv-tier-wait-max", "10",
    ]  # fmt: skip
    # Its own cache dir: `up` keeps the API key it makes there (not in the user's).
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("RTPLLM_API_KEY", "RTPLLM_API_KEY_FILE")}
    env["RTPLLM_CACHE_DIR"] = str(cache)
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        output = wait_until_ready(up)
        assert "ready: 1 prefill and 2 decode instance(s)" in output, output
        assert (tmp_path / "kvstore.log").is_file()
        gateway = Endpoint(url, read_secret_file(cache / "api_key"))  # made by `up`, for its clients
        assert get(gateway, "/instances").status_code == 200
        assert get(Endpoint(url, None), "/instances").status_code == 401
        client = client_for(gateway)
        text, cached = ask(client, PROMPT)
        assert cached == 0
        # The kvstore's KV events reach the gateway once the blocks are written through.
        deadline = time.monotonic() + 20
        while not all(i["kvstore_cached_blocks"] >= 10 for i in get(gateway, "/instances").json()["instances"]):
            assert time.monotonic() < deadline, "the kvstore never reported the prompt's blocks"
            time.sleep(0.1)
        repeat_text, repeat_cached = ask(client, PROMPT)
        assert repeat_cached >= 144, repeat_cached  # 9 of 10 blocks: the last token is always computed
        assert repeat_text == text

        def decode_loads() -> list[dict]:
            return [i["load"] for i in get(gateway, "/instances").json()["instances"] if i["role"] == "decode"]

        # Each decode served one of the two (round-robin), and the second restored the
        # prefix from the kvstore's host tier: it never computed it.
        deadline = time.monotonic() + 10
        while not all(load["prompt_tokens"] > 0 for load in decode_loads()):
            assert time.monotonic() < deadline, decode_loads()
            time.sleep(0.2)
        assert sorted(load["tier_hit_tokens"]["host"] for load in decode_loads())[0] == 0
        assert max(load["tier_hit_tokens"]["host"] for load in decode_loads()) >= 144
    except BaseException:
        dump_logs(tmp_path)
        raise
    finally:
        stop_up(up)
