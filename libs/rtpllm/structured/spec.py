"""What a request's output must match, with vLLM's names (`StructuredOutputsParams`).

Plain data, validated on construction, no grammar engine imported: the gateway, the
protocol and the engine all hold it. Compiling it is rtpllm.structured.grammar's job.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Any

# The constraint kinds, in the order vLLM lists its fields.
KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint on a request's output. Invalid values raise ValueError.

    - `json`: a JSON schema (a dict, or its JSON text). Kept as compact JSON text with
      the keys in the caller's order (properties are generated in that order), so the
      params compare, hash and cross the wire unchanged.
    - `regex`: a regular expression the whole output matches (Rust `regex` syntax).
    - `choice`: the output is exactly one of these strings.
    - `grammar`: a context-free grammar in Lark syntax or GBNF/EBNF (llguidance's).
    - `json_object`: any JSON object.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            object.__setattr__(
                self, "json", _json.dumps(self.json, separators=(",", ":"), ensure_ascii=False)
            )
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        self._validate()

    def _validate(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs must set exactly one of {', '.join(KINDS)}, got {', '.join(given) or 'none'}"
            )
        if self.json is not None:
            if not isinstance(self.json, str):
                raise ValueError(
                    f"structured_outputs.json must be a JSON schema object, got {type(self.json).__name__}"
                )
            try:
                schema = _json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise ValueError("structured_outputs.json must be a JSON schema object")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs.json_object must be a boolean")

    @property
    def kind(self) -> str:
        """Which constraint this is: one of KINDS."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema as a dict (json only)."""
        return _json.loads(self.json) if isinstance(self.json, str) else None
