"""The command line: subcommands, RTPLLM_* environment variables, documented flags."""

from __future__ import annotations

import argparse

import pytest

from rtpllm.cli import build_parser, options
from rtpllm.cli.flags import parse_bool
from rtpllm.cli.serve import gateway_settings, worker_settings
from rtpllm.cli.up import flags_to_argv


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_commands_exist() -> None:
    top = _subparsers(build_parser())
    assert {"up", "serve", "convert-gguf"} <= set(top)
    assert {"gateway", "worker", "prefill", "decode"} == set(_subparsers(top["serve"]))


def test_every_flag_documents_its_env_var() -> None:
    top = _subparsers(build_parser())
    parsers = [top["up"], *_subparsers(top["serve"]).values()]
    for parser in parsers:
        help_text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert "[env RTPLLM_" in (action.help or ""), f"{parser.prog} {action.option_strings}"
        assert "RTPLLM_NATS_URL" in help_text or parser.prog.endswith("up")
    for flag in options.BUS + options.MODEL + options.ENGINE + options.WORKER + options.GATEWAY + options.UP:
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
