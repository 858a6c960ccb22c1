"""Every rtpllm module imports where Triton is not installed (the CPU Docker image, a
CPU-only pip install): the kernel modules fall back to kernels/_triton.py's stand-ins,
and only launching a Triton kernel fails. Checked in a fresh interpreter in which any
`import triton` raises ImportError. (A module constant built with `tl.constexpr(...)`
once broke the CPU image's services at import, which no in-process test could see.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import importlib, importlib.abc, pkgutil, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, NoTriton())
import rtpllm
from rtpllm.kernels import _triton
assert not _triton.HAS_TRITON
failed = []
for info in pkgutil.walk_packages(rtpllm.__path__, "rtpllm."):
    if info.name.endswith("__main__"):
        continue  # runs the CLI
    try:
        importlib.import_module(info.name)
    except Exception as exc:
        failed.append(f"{info.name}: {exc!r}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_without_triton() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "libs"), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"modules that fail to import without Triton:\n{done.stdout}{done.stderr[-2000:]}"
