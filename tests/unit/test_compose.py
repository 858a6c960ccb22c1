"""docker-compose.yml stays right without a Docker engine (tests/docker runs it for real):
the design's topology on CPU by default, every rtpllm command and RTPLLM_* variable known
to the CLI, healthchecks and conditioned dependencies everywhere, GPUs only through the
override file."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from rtpllm.cli import build_parser, options

ROOT = Path(__file__).resolve().parents[2]
LONG_RUNNING = {"nats", "redis", "kvstore", "prefill", "decode", "vision", "gateway"}
FLAGS_OF = {
    "gateway": options.BUS + options.MODEL + options.GATEWAY,
    "prefill": options.BUS + options.MODEL + options.ENGINE + options.WORKER + options.DISAGG,
    "decode": options.BUS + options.MODEL + options.ENGINE + options.WORKER + options.DISAGG,
    "kvstore": options.BUS + options.KVSTORE,
    "vision": options.BUS + options.MODEL + options.VISION,
    "model": options.MODEL,
    "secrets": options.SECRETS,
}
ONE_SHOT = {"model", "secrets"}


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("docker-compose.yml")


def test_the_design_topology(compose: dict) -> None:
    assert set(compose["services"]) == LONG_RUNNING | ONE_SHOT
    assert compose["services"]["redis"]["image"].startswith("redis:")
    for name in LONG_RUNNING - {"redis"} | ONE_SHOT:
        assert compose["services"][name]["image"] == "rtpllm:latest", name
    assert (ROOT / "Dockerfile").is_file() and (ROOT / ".dockerignore").is_file()


def test_cpu_by_default_gpu_only_in_the_override(compose: dict) -> None:
    for name, service in compose["services"].items():
        assert "deploy" not in service, f"{name} reserves devices in the base file"
    for role in ("prefill", "decode", "vision"):
        assert compose["services"][role]["environment"]["RTPLLM_DEVICE"] == "cpu"
    gpu = load("docker-compose.gpu.yml")["services"]
    for role in ("prefill", "decode", "vision"):
        assert gpu[role]["environment"]["RTPLLM_DEVICE"] == "cuda"
        # Every GPU visible, one claimed per replica: not all on GPU 0.
        assert gpu[role]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
        assert gpu[role]["environment"]["RTPLLM_GPU_CLAIM_DIR"]
    assert set(gpu) == {"prefill", "decode", "vision"}


def test_every_command_and_variable_is_the_clis(compose: dict) -> None:
    parser = build_parser()
    names = set(compose["services"])
    for name, service in compose["services"].items():
        command = service.get("command")
        if not command or command[0] != "rtpllm":
            continue
        args = parser.parse_args(command[1:])  # SystemExit (a test failure) on an unknown flag
        if args.command == "serve":
            assert args.service == name  # the compose service runs the CLI service of its name
        known = {flag.env for flag in FLAGS_OF[name]}
        for var, value in service.get("environment", {}).items():
            assert var in known, f"{name}: {var} is no flag of `rtpllm {' '.join(command[1:])}`"
            if var.endswith("_URL"):
                assert urlparse(value).hostname in names, value
    gateway = compose["services"]["gateway"]
    assert gateway["environment"]["RTPLLM_HOST"] == "0.0.0.0"
    assert gateway["environment"]["RTPLLM_PORT"] == "8000"
    assert gateway["ports"] == ["${RTPLLM_PORT:-8000}:8000"]  # one fixed port, never a range


def test_replicas_need_no_per_replica_settings(compose: dict) -> None:
    for role in ("prefill", "decode", "vision", "kvstore"):
        env = compose["services"][role]["environment"]
        assert env["RTPLLM_KV_HOST"] == "0.0.0.0"  # the data plane announces the container's address
        assert not {"RTPLLM_INSTANCE_ID", "RTPLLM_KV_PORT"} & set(env)
        assert "container_name" not in compose["services"][role]


def test_healthchecks_and_conditioned_dependencies(compose: dict) -> None:
    for name in LONG_RUNNING:
        assert compose["services"][name]["healthcheck"]["test"], name
    for name, service in compose["services"].items():
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in compose["services"]
            assert spec["condition"] in ("service_healthy", "service_completed_successfully"), (name, dep)
    for role in ("prefill", "decode"):
        assert compose["services"][role]["healthcheck"]["test"][1:3] == ["rtpllm", "health"]
        assert compose["services"][role]["environment"]["RTPLLM_HEALTH_FILE"]
    # The gateway does not wait for a decode instance: it answers 503 + Retry-After until one is ready.
    assert "decode" not in compose["services"]["gateway"]["depends_on"]


def test_authenticated_by_default(compose: dict) -> None:
    """The secrets service makes every credential once into a volume; NATS and Redis
    demand theirs (never on a command line), every rtpllm service on the bus reads them
    from files, and the gateway wants an API key."""
    services = compose["services"]
    secrets = services["secrets"]
    assert secrets["command"][:2] == ["rtpllm", "secrets"] and secrets["restart"] == "no"
    directory = secrets["command"][2]
    assert f"secrets:{directory}" in secrets["volumes"]
    assert "secrets" in compose["volumes"]
    for name in ("nats", "redis"):
        assert services[name]["depends_on"]["secrets"]["condition"] == "service_completed_successfully"
        assert f"secrets:{directory}:ro" in services[name]["volumes"]
    assert services["nats"]["command"][1:3] == ["-c", f"{directory}/nats.conf"]
    assert f"requirepass \"$$(cat {directory}/redis_password)\"" in services["redis"]["command"][2]
    assert f"{directory}/redis_password" in services["redis"]["healthcheck"]["test"][1]
    for name in ("kvstore", "prefill", "decode", "vision", "gateway"):
        env = services[name]["environment"]
        assert env["RTPLLM_NATS_TOKEN_FILE"] == f"{directory}/nats_token", name
        assert env["RTPLLM_REDIS_PASSWORD_FILE"] == f"{directory}/redis_password", name
        assert f"secrets:{directory}:ro" in services[name]["volumes"], name
        # No secret in a variable: each comes from its file.
        assert not {"RTPLLM_NATS_TOKEN", "RTPLLM_REDIS_PASSWORD", "RTPLLM_API_KEY"} & set(env), name
    assert services["gateway"]["environment"]["RTPLLM_API_KEY_FILE"] == f"{directory}/api_key"
