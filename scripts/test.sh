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
exec python -m pytest -q --durations=25 "$@"
