"""`rtpllm serve MODEL`, vLLM's form: the whole stack with one worker, flags passed on."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtpllm.cli import build_parser, serve_model_argv


def test_serve_model_is_up_with_one_worker() -> None:
    argv = serve_model_argv(["serve", "smollm2-135m-instruct", "--port", "9000", "--max-model-len", "512"])
    assert argv == [
        "up",
        "--model",
        "smollm2-135m-instruct",
        "--workers",
        "1",
        "--port",
        "9000",
        "--max-model-len",
        "512",
    ]
    args = build_parser().parse_args(argv)
    assert (args.command, args.model, args.workers, args.port, args.max_model_len) == (
        "up",
        "smollm2-135m-instruct",
        1,
        9000,
        512,
    )


def test_serve_model_keeps_a_topology_the_flags_choose(tmp_path: Path) -> None:
    assert serve_model_argv(["serve", str(tmp_path), "--prefill", "1", "--decode", "1"]) == [
        "up", "--model", str(tmp_path), "--prefill", "1", "--decode", "1",
    ]  # fmt: skip
    assert serve_model_argv(["serve", str(tmp_path), "--workers=2"])[-1] == "--workers=2"


def test_services_stay_services() -> None:
    for argv in (["serve", "gateway", "--port", "1"], ["serve", "--help"], ["up"], ["serve"]):
        assert serve_model_argv(argv) == argv


@pytest.mark.parametrize("typo", ["gatway", "wroker", "kvstor", "decod"])
def test_a_mistyped_service_is_a_clear_error(typo: str) -> None:
    with pytest.raises(SystemExit, match="did you mean"):
        serve_model_argv(["serve", typo])


def test_a_directory_named_like_a_service_is_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gatway").mkdir()
    monkeypatch.chdir(tmp_path)
    assert serve_model_argv(["serve", "gatway"])[:3] == ["up", "--model", "gatway"]


def test_the_model_given_twice_is_an_error() -> None:
    with pytest.raises(SystemExit, match="twice"):
        serve_model_argv(["serve", "smollm2-135m-instruct", "--model", "x"])
