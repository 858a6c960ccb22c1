"""Plan a checkpoint load: which byte ranges of which files go into which parameter views.

The plan is pure bookkeeping (no I/O beyond the headers the caller parsed): every needed
tensor is matched to its destination, checked for shape, ordered by (file, offset) and
cut into extents -- large reads of up to `extent_bytes`, each starting at an aligned
file offset so it can be read with O_DIRECT. Adjacent tensors share an extent, a small
unneeded gap is read and discarded (one large read beats two), a large one starts a new
extent, and a tensor larger than an extent is split across several. Each extent lists
its pieces: (tensor, byte offset in the tensor, byte offset in the extent, length).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rtpllm.loader.safetensors_header import SafetensorsHeader
from rtpllm.loader.weights import CheckpointError

log = logging.getLogger(__name__)

# O_DIRECT needs file offsets, lengths and buffer addresses aligned to the logical block
# size; 4 KiB covers every common device.
ALIGN = 4096
# 8 MiB beat 16 MiB warm in both sweeps on the H100 machine (27.6 / 27.4 against 26.9 / 25.3
# GB/s, docs/benchmarks.md); smaller extents cost more in Python per byte than they save.
DEFAULT_EXTENT_BYTES = 8 << 20
# A gap below this is read and thrown away rather than splitting the extent.
DEFAULT_MAX_GAP = 1 << 20
# One extent becomes one preadv() on the CPU path; keep pieces + gaps under IOV_MAX (1024).
MAX_PIECES_PER_EXTENT = 256


def align_down(value: int) -> int:
    """The largest multiple of ALIGN <= value."""
    return value - value % ALIGN


def align_up(value: int) -> int:
    """The smallest multiple of ALIGN >= value."""
    return -(-value // ALIGN) * ALIGN


@dataclass(frozen=True, eq=False)
class TensorLoad:
    """One checkpoint tensor and the view it is loaded into.

    `direct` loads copy raw bytes straight into the destination (same dtype, contiguous);
    the others are assembled in a temporary of the source dtype and cast into place.
    """

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int
    dest: torch.Tensor

    @property
    def direct(self) -> bool:
        return self.dest.dtype == self.dtype and self.dest.is_contiguous()


@dataclass(frozen=True, eq=False)
class Piece:
    """`nbytes` bytes of `tensor` starting `tensor_offset` into it, found `extent_offset` into the extent."""

    tensor: TensorLoad
    tensor_offset: int
    extent_offset: int
    nbytes: int


@dataclass(frozen=True, eq=False)
class Extent:
    """One read: bytes [offset, end) of `path`; `offset` is aligned, `end` is the last piece's end."""

    path: Path
    offset: int
    end: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.offset


@dataclass(frozen=True, eq=False)
class LoadPlan:
    """Extents in (file, offset) order plus every tensor they fill (empty tensors have no pieces).

    Tensor parallelism: a rank can execute any sub-list of `extents` -- e.g. a balanced,
    disjoint share of them, whose bytes it then broadcasts to the other ranks over NCCL
    while it reads the next -- or build its own plan from `targets` restricted to the
    names (or, with row-sharded views, the byte ranges) it owns. The executor needs only
    that a cast (non-direct) tensor's pieces are all in the plan it runs.
    """

    extents: tuple[Extent, ...]
    tensors: tuple[TensorLoad, ...]
    extent_bytes: int

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def read_bytes(self) -> int:
        return sum(e.nbytes for e in self.extents)


def build_load_plan(
    headers: Sequence[SafetensorsHeader],
    targets: dict[str, torch.Tensor],
    *,
    optional: Iterable[str] = (),
    ignore: Callable[[str], bool] = lambda name: False,
    extent_bytes: int = DEFAULT_EXTENT_BYTES,
    max_gap: int = DEFAULT_MAX_GAP,
    source: str | Path = "",
) -> LoadPlan:
    """Match checkpoint tensors to `targets` and cut the needed bytes into extents.

    Same rules as `weights.load_checkpoint`: the first file (in `headers` order) holding
    a name wins; a checkpoint tensor that no target names is logged unless `ignore`
    says otherwise; a shape mismatch, or a target missing from every file and not in
    `optional`, raises CheckpointError (before any byte is read). `source` names the
    checkpoint in that error.

    To load only a subset (one tensor-parallel rank's share), pass only that subset's
    targets; see LoadPlan for the other way.
    """
    if extent_bytes <= 0 or extent_bytes % ALIGN:
        raise ValueError(f"extent_bytes must be a positive multiple of {ALIGN}, got {extent_bytes}")
    loads: dict[str, TensorLoad] = {}
    for header in headers:
        for t in header.tensors:
            dest = targets.get(t.name)
            if dest is None:
                if not ignore(t.name):
                    log.warning("checkpoint tensor %s is not used by the model", t.name)
                continue
            if t.name in loads:
                continue
            if t.shape != tuple(dest.shape):
                raise CheckpointError(
                    f"tensor {t.name} in {header.path} has shape {t.shape}, model expects {tuple(dest.shape)}"
                )
            loads[t.name] = TensorLoad(t.name, header.path, t.dtype, t.shape, t.start, t.nbytes, dest)
    missing = sorted(set(targets) - set(loads) - set(optional))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint in {source} lacks tensors the model needs: {shown}")

    by_file: dict[Path, list[TensorLoad]] = {}
    for load in loads.values():
        if load.nbytes:
            by_file.setdefault(load.path, []).append(load)
    extents: list[Extent] = []
    for path in [h.path for h in headers if h.path in by_file]:
        extents.extend(
            _cut_extents(path, sorted(by_file[path], key=lambda t: t.start), extent_bytes, max_gap)
        )
    return LoadPlan(extents=tuple(extents), tensors=tuple(loads.values()), extent_bytes=extent_bytes)


def _cut_extents(path: Path, loads: list[TensorLoad], extent_bytes: int, max_gap: int) -> list[Extent]:
    """Greedy cut of one file's needed tensors (sorted by offset) into aligned extents."""
    extents: list[Extent] = []
    base = limit = end = -1
    pieces: list[Piece] = []

    def close() -> None:
        if pieces:
            extents.append(Extent(path, base, end, tuple(pieces)))
            pieces.clear()

    for load in loads:
        pos, stop = load.start, load.start + load.nbytes
        while pos < stop:
            if not pieces or pos - end > max_gap or pos >= limit or len(pieces) >= MAX_PIECES_PER_EXTENT:
                close()
                # A split tensor continues exactly at the previous limit, which is aligned.
                base = align_down(pos)
                limit = base + extent_bytes
            take = min(stop, limit) - pos
            pieces.append(Piece(load, pos - load.start, pos - base, take))
            pos += take
            end = pos
    close()
    return extents
