"""Entry point of the gateway: run the app under uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import uvicorn

from rtpllm.serving.settings import GatewaySettings
from services.gateway.app import create_app


def run(settings: GatewaySettings, log_level: str = "info") -> int:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        access_log=False,  # per-request lines cost more than the rest of a streamed token
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        timeout_keep_alive=30,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1
