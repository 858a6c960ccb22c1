"""Entry point of a decode instance (disaggregated topology): the engine service with
role "decode"; see services/worker/main.py and docs/disaggregation.md."""

from __future__ import annotations

from dataclasses import replace

from rtpllm.serving.settings import WorkerSettings
from services.worker.main import run as run_engine_service


def run(settings: WorkerSettings) -> int:
    return run_engine_service(replace(settings, role="decode"))
