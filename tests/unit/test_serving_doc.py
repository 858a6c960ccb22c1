"""docs/serving.md documents every flag and environment variable of the CLI."""

from __future__ import annotations

from pathlib import Path

from rtpllm.cli import options

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def test_every_flag_and_env_var_is_documented() -> None:
    text = DOC.read_text()
    for group in (options.BUS, options.MODEL, options.ENGINE, options.WORKER, options.DISAGG, options.GATEWAY, options.UP, options.KVSTORE, options.SECRETS, options.VISION):
        for flag in group:
            assert f"`{flag.name}`" in text, flag.name
            assert f"`{flag.env}`" in text, flag.env
