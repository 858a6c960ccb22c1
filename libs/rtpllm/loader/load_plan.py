"""Plan a checkpoint load: which byte ranges of which files go into which parameter views.

The plan is pure bookkeeping (no I/O beyond the headers the caller parsed): every needed
tensor is matched to its destination, checked for shape, ordered by (file, offset) and
cut into extents -- large reads of up to `extent_bytes`, each starting at an aligned
file offset so it can be read with O_DIRECT. Adjacent tensors share an extent, a small
unneeded gap is read and discarded (one large read beats two), a large one starts a new
extent, and a tensor larger than an extent is split across several. Each extent lists
its pieces: (tensor, byte offset in the tensor, byte offset in the extent, length).

Tensor parallelism: a target may be a `Shard`, a rank's slice of the checkpoint tensor
along one dimension. Its bytes are one run of the file when the slice is along dim 0
(rows of a row-major tensor: q/k/v, gate/up, vocabulary shards) and one run per row
when along dim 1 (o_proj, down_proj columns); either way the pieces carry only the
rank's bytes, in file order, and the executors need nothing new. The other ranks'
columns between two runs are a small gap, read and dropped like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rtpllm.loader.safetensors_header import SafetensorsHeader
from rtpllm.loader.shard import Shard, Target
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
    """One checkpoint tensor (or a rank's slice of it) and the view it is loaded into.

    `runs` are the (file offset, length) byte ranges that, concatenated, are the
    destination's bytes (one for a whole tensor); `shape` is the destination's.
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
    runs: tuple[tuple[int, int], ...]

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
    targets: dict[str, Target],
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
    targets, `Shard`s for the tensors it holds a slice of; see LoadPlan for the other way.
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
            loads[t.name] = _tensor_load(t.name, header.path, t.dtype, t.shape, t.start, t.nbytes, dest)
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


def _tensor_load(
    name: str, path: Path, dtype: torch.dtype, shape: tuple[int, ...], start: int, nbytes: int, target: Target
) -> TensorLoad:
    """Match one checkpoint tensor to its target: check the shape, list the byte runs."""
    if not isinstance(target, Shard):
        if shape != tuple(target.shape):
            raise CheckpointError(f"tensor {name} in {path} has shape {shape}, model expects {tuple(target.shape)}")
        return TensorLoad(name, path, dtype, shape, start, nbytes, target, ((start, nbytes),))
    dest, dim = target.dest, target.dim
    want = tuple(dest.shape)
    length = want[dim] if dim < len(want) else 0
    if (
        len(shape) != len(want)
        or not 0 <= dim < len(shape)
        or shape[:dim] + shape[dim + 1 :] != want[:dim] + want[dim + 1 :]
        or target.start < 0
        or target.start + length > shape[dim]
    ):
        raise CheckpointError(
            f"tensor {name} in {path} has shape {shape}; the model's shard of it is {want} "
            f"from {target.start} along dim {dim}, which does not fit"
        )
    elem = nbytes // max(1, _numel(shape))
    inner = _numel(shape[dim + 1 :]) * elem  # bytes of one index along `dim`
    outer = _numel(shape[:dim])
    first = start + target.start * inner
    runs: tuple[tuple[int, int], ...]
    if length == shape[dim]:
        runs = ((start, nbytes),)
    elif outer == 1:
        runs = ((first, length * inner),)
    else:
        row = shape[dim] * inner
        runs = tuple((first + o * row, length * inner) for o in range(outer))
    size = sum(n for _, n in runs)
    return TensorLoad(name, path, dtype, want, runs[0][0] if runs else start, size, dest, runs)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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
        placed = 0  # bytes of the destination covered by earlier runs
        for run_start, run_bytes in load.runs:
            pos, stop = run_start, run_start + run_bytes
            while pos < stop:
                if not pieces or pos - end > max_gap or pos >= limit or len(pieces) >= MAX_PIECES_PER_EXTENT:
                    close()
                    # A split tensor continues exactly at the previous limit, which is aligned.
                    base = align_down(pos)
                    limit = base + extent_bytes
                take = min(stop, limit) - pos
                pieces.append(Piece(load, placed + pos - run_start, pos - base, take))
                pos += take
                end = pos
            placed += run_bytes
    close()
    return extents
