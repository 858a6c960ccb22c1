"""Command-line flags that also read an `RTPLLM_*` environment variable.

Precedence: flag > environment variable > default. `--help` shows each flag's variable
and default, so the help text is the configuration reference.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {value!r}")


@dataclass(frozen=True)
class Flag:
    """One flag: `--name`, its environment variable and how to parse it."""

    name: str
    env: str
    help: str
    default: Any = None
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    boolean: bool = False  # --name / --no-name
    aliases: tuple[str, ...] = ()  # short spellings (-tp)

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        default = self.default
        raw = os.environ.get(self.env)
        if raw is not None:
            try:
                default = parse_bool(raw) if self.boolean else self.type(raw)
            except ValueError as exc:
                raise SystemExit(f"error: environment variable {self.env}={raw!r}: {exc}") from None
        shown = "none" if self.default is None else self.default
        help_text = f"{self.help} [env {self.env}; default: {shown}]"
        if self.boolean:
            parser.add_argument(self.name, dest=self.dest, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(
                self.name, *self.aliases, dest=self.dest, default=default, type=self.type, choices=self.choices, help=help_text
            )


def add_flags(parser: argparse.ArgumentParser, title: str, flags: Sequence[Flag]) -> None:
    group = parser.add_argument_group(title)
    for flag in flags:
        flag.add_to(group)


def all_flags(groups: Sequence[Sequence[Flag]]) -> list[Flag]:
    """Flags of several groups, each name once (the first wins)."""
    seen: dict[str, Flag] = {}
    for group in groups:
        for flag in group:
            seen.setdefault(flag.name, flag)
    return list(seen.values())
