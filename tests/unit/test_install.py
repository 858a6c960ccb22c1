"""The README's Python example works from any directory, the parent of a clone named
`rtpllm` included (a directory without __init__.py there is a namespace package to Python
and used to shadow the editable install)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_import_from_the_parent_of_a_clone_named_rtpllm(tmp_path: Path) -> None:
    (tmp_path / "rtpllm" / "libs").mkdir(parents=True)  # what a clone's top level looks like
    (tmp_path / "rtpllm" / "pyproject.toml").write_text("")
    result = subprocess.run(
        [sys.executable, "-c", "from rtpllm import LLM, SamplingParams; import rtpllm; print(rtpllm.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("rtpllm/__init__.py")
