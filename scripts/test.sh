#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. GPU tests skip themselves without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Without a GPU the Triton kernels' tests (marked gpu) run on CPU tensors under Triton's
# interpreter, at small shapes; on a GPU machine they run compiled, at real ones.
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export TRITON_INTERPRET=1
fi
# Two worker processes (pytest-xdist): most tests wait on subprocesses (nats-server,
# Redis, workers) or on the interpreter's one thread, so two share a 2-core machine
# well: the whole suite took 10m40s on two workers against 17m22s on one, on the 2-core
# CI VM (README). RTPLLM_TEST_WORKERS=0 runs it in this process.
exec python -m pytest -q --durations=25 -n "${RTPLLM_TEST_WORKERS:-2}" "$@"
