#!/usr/bin/env bash
# Set up (if needed) and run the whole stack on the embedded default model:
# nats-server, redis-server, a worker and the OpenAI-compatible gateway on :8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec rtpllm up "$@"
