"""docker-compose.yml stays runnable without a Docker engine: every rtpllm command in it
parses with the real CLI, URLs point at services that exist, workers reserve a GPU."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from rtpllm.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_present(compose: dict) -> None:
    assert {"nats", "redis", "worker", "gateway"} <= set(compose["services"])
    assert compose["services"]["nats"]["image"].startswith("nats:")
    assert compose["services"]["redis"]["image"].startswith("redis:")
    assert (ROOT / "Dockerfile").is_file()


def test_every_rtpllm_command_parses(compose: dict) -> None:
    parser = build_parser()
    names = set(compose["services"])
    checked = 0
    for name, service in compose["services"].items():
        command = service.get("command")
        if not command or command[0] != "rtpllm":
            continue
        args = parser.parse_args(command[1:])  # SystemExit (a test failure) on any unknown flag
        assert args.command == "serve"
        assert args.service == name  # the compose service runs the CLI service of its name
        for url in (args.nats, args.redis):
            if url:
                assert urlparse(url).hostname in names, url
        checked += 1
    assert checked == 2


def test_worker_reserves_a_gpu_and_gateway_listens(compose: dict) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    gateway = build_parser().parse_args(compose["services"]["gateway"]["command"][1:])
    assert gateway.host == "0.0.0.0"
    assert any(str(p).endswith(f":{gateway.port}") for p in compose["services"]["gateway"]["ports"])
