"""Load an HF safetensors checkpoint straight into a model's parameter views."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from rtpllm.loader.shard import Shard, Target

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing files or tensors, bad shapes, corruption."""


@dataclass(frozen=True)
class LoadStats:
    bytes_read: int
    seconds: float
    num_tensors: int
    # Where the time went, when the loader measures it (fast_loader's C and Python ring
    # loops: RingTimings.as_dict()); for logs and bench/load.py.
    detail: dict[str, float | int] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's shard files, from the index when there is one."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({root / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {root}")
    return files


def load_checkpoint(
    model_dir: str | Path,
    targets: dict[str, Target],
    *,
    optional: Iterable[str] = (),
    ignore: Callable[[str], bool] = lambda name: False,
) -> LoadStats:
    """Copy every checkpoint tensor named in `targets` into its destination view.

    Destinations decide dtype and device (the copy casts). Names in `optional` may be
    absent; names for which `ignore` is true are skipped; any other missing tensor or a
    shape mismatch raises CheckpointError naming it. A `Shard` target receives its slice
    of the checkpoint tensor (tensor parallelism).
    """
    start = time.perf_counter()
    pending = dict(targets)
    nbytes = 0
    count = 0
    for path in safetensors_files(model_dir):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        with handle as f:
            for name in f.keys():
                dest = pending.pop(name, None)
                if dest is None:
                    if name not in targets and not ignore(name):
                        log.warning("checkpoint tensor %s is not used by the model", name)
                    continue
                try:
                    src = f.get_tensor(name)
                except Exception as exc:
                    raise CheckpointError(f"cannot read tensor {name} from {path}: {exc}") from exc
                if isinstance(dest, Shard):
                    if not 0 <= dest.dim < src.dim() or dest.start + dest.dest.shape[dest.dim] > src.shape[dest.dim]:
                        raise CheckpointError(f"tensor {name} in {path} has shape {tuple(src.shape)}; the model's shard does not fit")
                    src, dest = src.narrow(dest.dim, dest.start, dest.dest.shape[dest.dim]), dest.dest
                if tuple(src.shape) != tuple(dest.shape):
                    raise CheckpointError(
                        f"tensor {name} in {path} has shape {tuple(src.shape)}, model expects {tuple(dest.shape)}"
                    )
                dest.copy_(src)
                nbytes += src.numel() * src.element_size()
                count += 1
    missing = sorted(set(pending) - set(optional))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint in {model_dir} lacks tensors the model needs: {shown}")
    return LoadStats(bytes_read=nbytes, seconds=time.perf_counter() - start, num_tensors=count)
