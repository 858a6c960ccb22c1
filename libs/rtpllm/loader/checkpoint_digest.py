"""The content digest of a checkpoint: what names a model in its KV block keys.

KV blocks outlive a process in the SSD and Redis tiers, keyed by block keys seeded by a
namespace that names the model (rtpllm.kvcache.block_hash). Naming the model by its
path would serve new weights at an old path the old weights' KV; so the namespace is
seeded by this digest instead: equal digests mean equal bytes, wherever the files lie.

The rule (DIGEST_VERSION 1):

- Covered: `config.json`, `preprocessor_config.json` when there is one (it shapes the
  image embeddings a multimodal prompt's KV depends on), and every weight file the
  loader reads (`safetensors_files`), each by its name relative to the model directory.
  Not covered: tokenizer files and generation defaults (KV depends on token ids, not on
  how text became them), and anything else in the directory.
- Every byte of every covered file is hashed: SHA-256 over 16 MiB chunks on several
  threads (hashlib releases the GIL; SHA-NI makes it ~1.8 GB/s a core), combined into
  one digest per file, and the files' (name, digest) pairs into the checkpoint's. No
  sampling: two checkpoints that differ in one tensor (a fine-tune of a few layers,
  retrained embedding rows) get different namespaces. The cost is one read of the
  weights on the first start, right after the loader has read them (page cache).
- Cached per weight file under `cache_dir` (the engine uses $RTPLLM_CACHE_DIR/digests),
  keyed by the file's resolved path, size, mtime, ctime, inode and device: a second
  start only stats the files. Any rewrite changes the inode (a new file renamed in) or
  ctime (written in place; unlike mtime, `cp -p`/`rsync -t`/`touch -d` cannot set it
  back), so a stale entry is never used; a spurious change (chmod) costs a recompute.
- Processes starting together (prefill and decode) hash a file once: the others wait
  on a lock file and then read the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from rtpllm.loader.weights import safetensors_files

log = logging.getLogger(__name__)

DIGEST_VERSION = 1
CHUNK_BYTES = 16 << 20
OPTIONAL_FILES = ("preprocessor_config.json",)


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file without reading it (the cache key)."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        real = path.resolve()
        st = real.stat()
        return cls(str(real), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


@dataclass(frozen=True)
class CheckpointDigest:
    """A checkpoint's digest (hex), and what computing it took."""

    digest: str
    files: int
    bytes_hashed: int  # config files only, when every weight file's digest came from the cache
    cached_files: int  # weight files whose digest came from the cache
    seconds: float


def checkpoint_digest(
    model_dir: str | Path, cache_dir: str | Path | None = None, threads: int | None = None
) -> CheckpointDigest:
    """The content digest of the checkpoint in `model_dir` (see the module docstring);
    weight files' digests are cached under `cache_dir` (None: no cache)."""
    t0 = time.perf_counter()
    root = Path(model_dir)
    cache = Path(cache_dir) if cache_dir is not None else None
    configs = [root / "config.json", *(root / name for name in OPTIONAL_FILES if (root / name).is_file())]
    weights = safetensors_files(root)
    total = hashlib.sha256(f"rtpllm-checkpoint-v{DIGEST_VERSION}\n".encode())
    hashed = cached = 0
    with ThreadPoolExecutor(
        threads or min(8, os.cpu_count() or 1), thread_name_prefix="weights-digest"
    ) as pool:
        for path in [*configs, *weights]:
            if path in configs:  # a few KB: hashed every time
                digest, from_cache = file_digest(path, pool), False
            else:
                digest, from_cache = _cached_file_digest(path, cache, pool)
            if from_cache:
                cached += 1
            else:
                hashed += path.stat().st_size
            total.update(f"{path.relative_to(root).as_posix()}\0{digest}\n".encode())
    return CheckpointDigest(
        total.hexdigest(), len(configs) + len(weights), hashed, cached, time.perf_counter() - t0
    )


def weights_identity(
    model_dir: str | Path,
    cache_dir: str | Path | None,
    *,
    random_seed: int | None = None,
    device: str = "cpu",
) -> str:
    """What seeds an engine's KV namespace: "weights:<checkpoint digest>", or for random
    weights (`random_seed`, load_format "dummy") the config files' digest, the seed and
    the device type (a CPU and a CUDA generator draw different weights from one seed)."""
    root = Path(model_dir)
    if random_seed is not None:
        h = hashlib.sha256(
            f"rtpllm-random-v{DIGEST_VERSION}\0{random_seed}\0{device.split(':')[0]}\n".encode()
        )
        for name in ("config.json", *OPTIONAL_FILES):
            if (root / name).is_file():
                h.update(f"{name}\0{hashlib.sha256((root / name).read_bytes()).hexdigest()}\n".encode())
        return f"random:{h.hexdigest()}"
    result = checkpoint_digest(root, cache_dir)
    log.info(
        "weights digest %s: %d files, %.2f GB hashed in %.2f s, %d from the cache",
        result.digest[:16], result.files, result.bytes_hashed / 1e9, result.seconds, result.cached_files,
    )  # fmt: skip
    return f"weights:{result.digest}"


def file_digest(path: Path, pool: ThreadPoolExecutor) -> str:
    """SHA-256 of each CHUNK_BYTES chunk (in parallel), then of the size and their digests.
    Reads with pread rather than mmap: a file truncated meanwhile is an error, not SIGBUS."""
    size = path.stat().st_size
    out = hashlib.sha256(f"rtpllm-file-v{DIGEST_VERSION}\0{size}\0".encode())
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

        def chunk(start: int) -> bytes:
            n = min(CHUNK_BYTES, size - start)
            view = _buffer()[:n]
            got = 0
            while got < n:
                k = os.preadv(fd, [view[got:]], start + got)  # releases the GIL, as sha256 does
                if k == 0:
                    raise OSError(f"{path} shrank while it was being hashed")
                got += k
            return hashlib.sha256(view).digest()

        for digest in pool.map(chunk, range(0, size, CHUNK_BYTES)):
            out.update(digest)
    finally:
        os.close(fd)
    return out.hexdigest()


_local = threading.local()


def _buffer() -> memoryview:
    """This thread's CHUNK_BYTES read buffer (allocated once: zeroing 16 MiB per chunk
    would cost a third of hashing it)."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(CHUNK_BYTES))
    return buf


def _cached_file_digest(path: Path, cache: Path | None, pool: ThreadPoolExecutor) -> tuple[str, bool]:
    """(digest, whether it came from the cache)."""
    stamp = FileStamp.of(path)
    if cache is None:
        return file_digest(path, pool), False
    entry = cache / f"{hashlib.sha256(stamp.path.encode()).hexdigest()[:32]}.json"
    found = _read_entry(entry, stamp)
    if found is not None:
        return found, True
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(entry.with_suffix(".lock"), "a+")  # noqa: SIM115 -- held across the hash below
    except OSError as exc:  # a read-only cache directory: hash every time
        log.debug("no digest cache in %s: %s", cache, exc)
        return file_digest(path, pool), False
    with lock:
        # One process hashes, the others wait here, then find its entry. flock is
        # dropped by the kernel if the holder dies: a crash cannot wedge a start.
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        found = _read_entry(entry, stamp)
        if found is not None:
            return found, True
        digest = file_digest(path, pool)
        if FileStamp.of(path) == stamp:  # not changed while it was read
            _write_entry(entry, stamp, digest)
        return digest, False


def _read_entry(entry: Path, stamp: FileStamp) -> str | None:
    try:
        data = json.loads(entry.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("version") != DIGEST_VERSION
        or data.get("stamp") != asdict(stamp)
    ):
        return None
    digest = data.get("digest")
    return digest if isinstance(digest, str) else None


def _write_entry(entry: Path, stamp: FileStamp, digest: str) -> None:
    tmp = entry.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"version": DIGEST_VERSION, "stamp": asdict(stamp), "digest": digest}))
        os.replace(tmp, entry)  # readers see the old entry or the new one, never half
    except OSError as exc:
        log.debug("could not cache the digest of %s: %s", stamp.path, exc)
        tmp.unlink(missing_ok=True)
