"""The command line: subcommands, RTPLLM_* environment variables, documented flags."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import pytest

from rtpllm.cli import build_parser, options
from rtpllm.cli.flags import parse_bool
from rtpllm.cli.serve import gateway_settings, kvstore_settings, worker_settings
from rtpllm.cli.up import flags_to_argv, run_up
from rtpllm.protocol.subjects import default_host_id


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_commands_exist() -> None:
    top = _subparsers(build_parser())
    assert {"up", "serve", "convert-gguf"} <= set(top)
    assert {"gateway", "worker", "prefill", "decode", "kvstore", "vision"} == set(_subparsers(top["serve"]))


def test_every_flag_documents_its_env_var() -> None:
    top = _subparsers(build_parser())
    parsers = [top["up"], *_subparsers(top["serve"]).values()]
    for parser in parsers:
        help_text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert "[env RTPLLM_" in (action.help or ""), f"{parser.prog} {action.option_strings}"
        assert "RTPLLM_NATS_URL" in help_text or parser.prog.endswith("up")
    for flag in options.BUS + options.MODEL + options.ENGINE + options.WORKER + options.GATEWAY + options.UP + options.KVSTORE:
        assert flag.env.startswith("RTPLLM_")


def test_env_var_then_flag_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTPLLM_NATS_URL", "nats://from-env:4222")
    monkeypatch.setenv("RTPLLM_MAX_QUEUE", "7")
    monkeypatch.setenv("RTPLLM_PREFIX_CACHING", "off")
    args = build_parser().parse_args(["serve", "gateway"])
    assert args.nats == "nats://from-env:4222" and args.max_queue == 7
    args = build_parser().parse_args(["serve", "gateway", "--nats", "nats://flag:1", "--max-queue", "9"])
    assert args.nats == "nats://flag:1" and args.max_queue == 9
    wargs = build_parser().parse_args(["serve", "worker", "--device", "cpu"])
    assert wargs.prefix_caching is False
    assert worker_settings(wargs).engine.cache.enable_prefix_caching is False


def test_bad_env_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTPLLM_PORT", "eighty")
    with pytest.raises(SystemExit, match="RTPLLM_PORT"):
        build_parser()


def test_settings_from_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "gateway", "--port", "9000", "--router", "round-robin", "--request-timeout", "5", "--lease", "2"]
    )
    s = gateway_settings(args)
    assert (s.port, s.router, s.request_timeout_s, s.lease_s) == (9000, "round-robin", 5.0, 2.0)
    w = worker_settings(build_parser().parse_args(["serve", "worker", "--device", "cpu", "--num-blocks", "64", "--cpu-kv-gib", "0.5"]))
    assert w.engine.device == "cpu" and w.engine.cache.num_blocks == 64 and w.engine.cache.cpu_kv_bytes == 1 << 29
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "gateway", "--router", "nope"])


def test_up_passes_engine_flags_to_workers() -> None:
    args = build_parser().parse_args(["up", "--device", "cpu", "--max-model-len", "512", "--no-prefix-caching"])
    argv = flags_to_argv(options.ENGINE, args)
    reparsed = build_parser().parse_args(["serve", "worker", *argv])
    for flag in options.ENGINE:
        assert getattr(reparsed, flag.dest) == getattr(args, flag.dest)


def test_parse_bool() -> None:
    assert parse_bool("Yes") and not parse_bool("0")
    with pytest.raises(ValueError):
        parse_bool("maybe")


def test_kvstore_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "kvstore", "--redis", "redis://r:6379/0", "--kv-redis", "--kv-ssd-dir", "/tmp/kv", "--kv-staging-mib", "64", "--kv-port", "7000"]
    )
    s = kvstore_settings(args)
    assert s.host_id == default_host_id() and s.host_bytes == 4 << 30, "a kvstore has a host tier by default"
    assert (s.redis_url, s.ssd_dir, s.staging_bytes, s.kv_port) == ("redis://r:6379/0", "/tmp/kv", 64 << 20, 7000)
    assert kvstore_settings(build_parser().parse_args(["serve", "kvstore", "--host-id", "gpu-7"])).host_id == "gpu-7"
    with pytest.raises(SystemExit):
        kvstore_settings(build_parser().parse_args(["serve", "kvstore", "--host-id", "gpu-7.local"]))
    w = worker_settings(build_parser().parse_args(["serve", "worker", "--device", "cpu", "--nats", "nats://n:1", "--kvstore"]))
    assert w.engine.offload.kvstore_host_id == default_host_id() and w.engine.offload.kvstore_nats_url == "nats://n:1"
    assert w.engine.offload.enabled and w.engine.offload.host_bytes == 0 and w.engine.offload.write_through is None
    w = worker_settings(build_parser().parse_args(["serve", "decode", "--device", "cpu", "--kv-write-through", "off"]))
    assert w.engine.offload.kvstore_host_id is None and w.engine.offload.write_through is False


def test_vision_flags() -> None:
    from rtpllm.cli.serve import vision_settings

    args = build_parser().parse_args(
        ["serve", "vision", "--model", "/m", "--device", "cpu", "--cache-gib", "0.5", "--batch-wait-ms", "5",
         "--max-batch-images", "4", "--kvstore", "--nats", "nats://n:1", "--load-format", "dummy", "--seed", "3"]
    )  # fmt: skip
    v = vision_settings(args)
    assert (v.model, v.device, v.cache_bytes, v.batch_wait_s, v.max_batch_images) == ("/m", "cpu", 1 << 29, 0.005, 4)
    assert (v.kvstore_host_id, v.kvstore_nats_url, v.load_format, v.seed) == (default_host_id(), "nats://n:1", "dummy", 3)
    assert vision_settings(build_parser().parse_args(["serve", "vision", "--device", "cpu"])).kvstore_host_id is None
    w = worker_settings(build_parser().parse_args(["serve", "worker", "--device", "cpu", "--embedding-pool-mib", "8", "--local-encode-below", "64"]))
    assert (w.embedding_pool_bytes, w.local_encode_below) == (8 << 20, 64)


def test_up_starts_a_vision_service_for_a_vision_language_model_only(tmp_path: Path) -> None:
    from rtpllm.cli.up import _has_vision
    from rtpllm.loader.random_checkpoint import write_random_checkpoint

    assert not _has_vision(str(write_random_checkpoint(tmp_path / "text", "llama")))
    assert not _has_vision(str(tmp_path / "missing"))
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    (vlm / "config.json").write_text(
        '{"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"], "hidden_size": 64, '
        '"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, '
        '"vocab_size": 300, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, '
        '"vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 4}}'
    )
    assert _has_vision(str(vlm))


def test_up_kvstore_gives_the_tier_flags_to_the_kvstore(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rtpllm.cli import up

    monkeypatch.setenv("RTPLLM_CACHE_DIR", str(tmp_path))  # where `up` keeps its API key
    seen = {}

    class FakeStack:
        def __init__(self, config: object) -> None:
            seen["config"] = config
            raise KeyboardInterrupt  # stop before anything starts

    monkeypatch.setattr(up, "Stack", FakeStack)
    monkeypatch.setattr(up.signal, "signal", lambda *a: None)  # keep pytest's SIGTERM handler
    args = build_parser().parse_args(["up", "--model", "/", "--device", "cpu", "--kvstore", "--kv-ssd-dir", "/tmp/kv"])
    with pytest.raises(KeyboardInterrupt):
        up.run_up(args)
    config = seen["config"]
    assert config.kvstore and "--kvstore" in config.worker_args
    assert "--kv-ssd-dir" not in config.worker_args and "--kv-host-gib" not in config.worker_args
    assert config.kvstore_args[:2] == ["--kv-ssd-dir", "/tmp/kv"], "host memory: the kvstore's default"
    kv = build_parser().parse_args(["serve", "kvstore", *config.kvstore_args])
    assert kv.kv_ssd_dir == "/tmp/kv" and kv.kv_host_gib == 4.0


def test_tensor_parallel_prefill_and_decode_instances(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rtpllm.cli import up

    # PD transfers and the KV tiers move every rank's KV heads (docs/tensor_parallel.md):
    # prefill and decode instances take -tp like workers, with the kvstore (the default)
    # or without it.
    for role in ("prefill", "decode"):
        settings = worker_settings(build_parser().parse_args(["serve", role, "--device", "cpu", "-tp", "2"]))
        assert settings.engine.tensor_parallel_size == 2 and settings.role == role
    monkeypatch.setenv("RTPLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(up.signal, "signal", lambda *a: None)
    seen = {}

    class FakeStack:
        def __init__(self, config: object) -> None:
            seen["config"] = config
            raise KeyboardInterrupt  # stop before anything starts

    monkeypatch.setattr(up, "Stack", FakeStack)
    for kvstore in ([], ["--no-kvstore"]):
        with pytest.raises(KeyboardInterrupt):
            up.run_up(build_parser().parse_args(["up", "--model", "/", "--device", "cpu", "-tp", "2", *kvstore]))
        config = seen["config"]
        assert config.prefill == 1 and config.decode == 1 and config.kvstore == (not kvstore)
        assert ("--kvstore" in config.worker_args) == (not kvstore)
        i = config.worker_args.index("--tensor-parallel-size")
        assert config.worker_args[i + 1] == "2"
    assert "error" not in capsys.readouterr().out


def test_up_refuses_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    # Another server's /ready must not pass for ours: `up` stops before starting anything.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = build_parser().parse_args(["up", "--device", "cpu", "--port", str(port), "--model", "."])
        assert run_up(args) == 1
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().out


def test_a_gateway_never_imports_torch(tmp_path: Path) -> None:
    """The gateway of a text model needs only the tokenizer: its settings, app and entry
    point import no torch (a fresh interpreter, as `rtpllm serve gateway` runs)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from rtpllm.cli import build_parser\n"
        "from rtpllm.cli.serve import gateway_settings\n"
        f"gateway_settings(build_parser().parse_args(['serve', 'gateway', '--model', {str(tmp_path)!r}]))\n"
        "import services.gateway.main, services.gateway.app\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "preset, expected",
    [({}, {"GOMP_SPINCOUNT": "1000"}), ({"OMP_WAIT_POLICY": "PASSIVE"}, {}), ({"GOMP_SPINCOUNT": "5"}, {"GOMP_SPINCOUNT": "5"})],
)
def test_openmp_threads_spin_briefly_unless_the_user_chose(preset: dict[str, str], expected: dict[str, str]) -> None:
    from rtpllm.openmp import default_spin_count

    environ = dict(preset)
    default_spin_count(environ)
    assert environ == {**preset, **expected}


def test_importing_rtpllm_sets_the_spin_count_before_torch_loads() -> None:
    """A fresh interpreter, as every service starts: the setting is there before torch."""
    import os
    import subprocess
    import sys

    code = "import os, sys, rtpllm; assert 'torch' not in sys.modules; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1000"


def test_up_refuses_a_tensor_parallel_size_the_model_cannot_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One line before anything starts (it was every worker's traceback, later)."""
    from rtpllm.loader.random_checkpoint import write_random_checkpoint
    from rtpllm.models.config import ModelConfig

    model = write_random_checkpoint(tmp_path / "m", "llama")
    heads = ModelConfig.from_dir(model).num_heads
    size = next(n for n in range(2, 64) if heads % n)
    args = build_parser().parse_args(["up", "--device", "cpu", "--model", str(model), "-tp", str(size)])
    assert run_up(args) == 2
    out = capsys.readouterr().out
    assert f"error: tensor_parallel_size={size} does not divide the model's {heads} attention heads" in out
    assert "starting" not in out
