"""Parse and validate a safetensors file header without reading its tensor data.

Format: 8-byte little-endian header length N, then N bytes of JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
first byte after the header; an optional ``__metadata__`` entry holds strings), then the
data. Everything a loader later trusts -- offsets inside the file, byte counts that
match dtype x shape, no two tensors sharing bytes -- is checked here, so a truncated or
corrupt file fails with a CheckpointError naming the file and tensor instead of a short
read or a crash deep inside torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from rtpllm.loader.weights import CheckpointError

# safetensors itself refuses headers above 100 MB; a larger length is corruption.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype codes -> torch dtypes; codes whose torch dtype this build lacks are
# left out (a file using one fails with "unsupported dtype").
_DTYPE_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}


@dataclass(frozen=True)
class TensorHeader:
    """One tensor of a safetensors file; `start`/`end` are absolute byte offsets in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: every tensor lies inside the file and no two overlap."""

    path: Path
    file_size: int
    data_start: int
    tensors: tuple[TensorHeader, ...]  # in header order


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of one safetensors file (reads only the header bytes)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path} is truncated: {file_size} bytes, too short for a safetensors header"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > file_size - 8:
                raise CheckpointError(
                    f"{path} is truncated or corrupt: header length {header_len} exceeds the file size {file_size}"
                )
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} is corrupt: header length {header_len} is implausibly large")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if len(raw) < header_len:
        raise CheckpointError(
            f"{path} is truncated: the header ends after {8 + len(raw)} of {8 + header_len} bytes"
        )
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has a corrupt header (not valid JSON): {exc}") from exc
    if not isinstance(parsed, dict):
        raise CheckpointError(
            f"{path} has a corrupt header: expected a JSON object, got {type(parsed).__name__}"
        )
    data_start = 8 + header_len
    tensors = [
        _parse_entry(path, name, entry, data_start, file_size)
        for name, entry in parsed.items()
        if name != "__metadata__"
    ]
    _check_no_overlap(path, tensors)
    return SafetensorsHeader(path=path, file_size=file_size, data_start=data_start, tensors=tuple(tensors))


def _parse_entry(path: Path, name: str, entry: object, data_start: int, file_size: int) -> TensorHeader:
    where = f"tensor {name} in {path}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: corrupt header entry {entry!r}")
    code = entry.get("dtype")
    dtype = DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: unsupported or corrupt dtype {code!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointError(f"{where}: corrupt shape {shape!r}")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise CheckpointError(f"{where}: corrupt data_offsets {offsets!r}")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{where}: corrupt data_offsets {offsets} (end before begin)")
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: corrupt header, data_offsets {offsets} span {end - begin} bytes but "
            f"dtype {code} x shape {tuple(shape)} needs {expected}"
        )
    if data_start + end > file_size:
        raise CheckpointError(
            f"{where}: file is truncated or its header is corrupt; the tensor needs bytes up to "
            f"{data_start + end} but the file has {file_size}"
        )
    return TensorHeader(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_uint(value: object) -> bool:
    # bool is an int subclass in Python; `true` in a shape is corruption, not 1.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path: Path, tensors: list[TensorHeader]) -> None:
    # Empty tensors occupy no bytes, so they may sit at any offset.
    ordered = sorted((t for t in tensors if t.nbytes), key=lambda t: t.start)
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if cur.start < prev.end:
            raise CheckpointError(
                f"{path} has a corrupt header: tensors {prev.name} and {cur.name} overlap "
                f"(bytes {prev.start}-{prev.end} and {cur.start}-{cur.end})"
            )
