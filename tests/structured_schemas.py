"""Random JSON schemas for structured-output tests and bench/structured_outputs.py:
nested objects, arrays, enums, required fields, and numbers, integers, booleans and
strings with limits. Seeded: schema i of a seed is the same on every run.

Strings and arrays are bounded (maxLength, maxItems) as a schema meant for a model
usually is: the grammar can only end what the schema lets end.
"""

from __future__ import annotations

import random
from typing import Any

_WORDS = (
    "name id title city color size count price score level kind status owner email tag note "
    "year month day width height speed rating label code region team role"
).split()
_ENUM_WORDS = ("red green blue small medium large alpha beta gamma north south east west yes no").split()


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """An object schema with 2-5 properties, some required, nested at most 2 deep."""
    names = rng.sample(_WORDS, rng.randint(2, 5))
    properties = {name: _value(rng, depth) for name in names}
    required = [n for n in names if rng.random() < 0.7] or [names[0]]
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if rng.random() < 0.5:
        schema["additionalProperties"] = False
    return schema


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    kinds = ["string", "integer", "number", "boolean", "enum", "array"]
    if depth < 2:
        kinds.append("object")
    kind = rng.choice(kinds)
    if kind == "string":
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": rng.randint(max(low, 1), 24)}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(1, 1000)}
    if kind == "number":
        low = rng.choice([0, -10, 1.5])
        return {"type": "number", "minimum": low, "maximum": low + rng.choice([1, 100, 1e4])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        if rng.random() < 0.7:
            return {"type": "string", "enum": rng.sample(_ENUM_WORDS, rng.randint(2, 4))}
        return {"enum": rng.sample([1, 2, 3, 5, 8, 13, "n/a", None], rng.randint(2, 4))}
    if kind == "array":
        items = rng.choice(
            [
                {"type": "string", "maxLength": 12},
                {"type": "integer", "minimum": 0, "maximum": 99},
                {"type": "boolean"},
            ]
        )
        if depth < 2 and rng.random() < 0.3:
            items = random_schema(rng, depth + 1)
        low = rng.randint(0, 2)
        return {"type": "array", "items": items, "minItems": low, "maxItems": low + rng.randint(1, 3)}
    return random_schema(rng, depth + 1)


def schemas(count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [random_schema(rng) for _ in range(count)]
