"""`--set MODULE.NAME=VALUE` for the bench scripts: run with one of the engine's
module-level switches changed (e.g. `--set attention.triton_backend.QUANT_EXTEND_STORE_FIRST=1`),
the way a candidate is timed against today's default before it becomes the default.
Only existing upper-case constants of `rtpllm` modules can be set, to a value of the
same kind (bool, int, float, or None where the constant is None or an int)."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

TRUE, FALSE = {"1", "true", "on", "yes"}, {"0", "false", "off", "no"}


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
        help="set an rtpllm module constant for this run (repeatable), e.g. kernels.decode_attention.INT8_WIDEN_PAIRS=1",
    )  # fmt: skip


def _parse(raw: str, current: Any, what: str) -> Any:
    low = raw.strip().lower()
    if low == "none":
        if current is None or isinstance(current, int) and not isinstance(current, bool):
            return None
        raise SystemExit(f"--set {what}: None is not allowed for a {type(current).__name__}")
    if isinstance(current, bool):
        if low in TRUE | FALSE:
            return low in TRUE
        raise SystemExit(f"--set {what}: expected one of {sorted(TRUE | FALSE)}")
    try:
        if isinstance(current, float):
            return float(raw)
        return int(raw)  # ints, and None-valued constants that take an int
    except ValueError:
        raise SystemExit(f"--set {what}: {raw!r} is not {'a float' if isinstance(current, float) else 'an int'}") from None


def apply(settings: list[str]) -> dict[str, Any]:
    """Set each MODULE.NAME=VALUE; returns {"MODULE.NAME": value} for the results file."""
    done: dict[str, Any] = {}
    for item in settings:
        name, sep, raw = item.partition("=")
        module, _, attr = name.rpartition(".")
        if not sep or not module or not attr.isupper():
            raise SystemExit(f"--set {item}: expected MODULE.NAME=VALUE with an upper-case NAME")
        try:
            mod = importlib.import_module(f"rtpllm.{module}")
        except ModuleNotFoundError:
            raise SystemExit(f"--set {item}: no module rtpllm.{module}") from None
        if not hasattr(mod, attr):
            raise SystemExit(f"--set {item}: rtpllm.{module} has no {attr}")
        value = _parse(raw, getattr(mod, attr), item)
        setattr(mod, attr, value)
        done[name] = value
    return done
