"""Wiring of the gateway: NATS, dispatcher, admission, metrics, tokenizer and the HTTP
routes of `rtpllm.api.server.OpenAIServer` in one FastAPI app."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from rtpllm.api import errors
from rtpllm.api.access_log import AccessLogMiddleware
from rtpllm.api.auth import APIKeyMiddleware, APIKeys, open_paths
from rtpllm.api.errors import APIError
from rtpllm.api.generation import GatewayCore
from rtpllm.api.images import ImageLoader, MediaSettings
from rtpllm.api.openapi import describe_request_bodies
from rtpllm.api.requests import ChatCompletionRequest, CompletionRequest
from rtpllm.api.server import OpenAIServer, error_response, json_response
from rtpllm.api.tokenize import DetokenizeRequest, TokenizeCompletionRequest
from rtpllm.credentials import redact_url
from rtpllm.models.registry import served_model_name
from rtpllm.protocol import subjects
from rtpllm.protocol.subjects import InstanceRole
from rtpllm.routing.policy import make_policy
from rtpllm.routing.prefix_index import PrefixIndex
from rtpllm.serving.admission import AdmissionController
from rtpllm.serving.bus import connect_nats
from rtpllm.serving.dependencies import RedisCheck
from rtpllm.serving.dispatcher import Dispatcher, DispatcherConfig
from rtpllm.serving.metrics import GatewayMetrics
from rtpllm.serving.settings import GatewaySettings, new_id
from rtpllm.serving.stats_log import StatsLogger
from rtpllm.serving.vision_registry import VisionRegistry
from rtpllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from rtpllm.multimodal.families import VisionFamily

log = logging.getLogger("rtpllm.gateway")


def model_dir(model: str) -> Path:
    """A model directory as is; a known name through the registry (imported only then:
    it pulls in torch, which a gateway given a directory never needs)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from rtpllm.models.registry import resolve_model

    return resolve_model(model)


def load_tokenizer(model: str) -> Tokenizer:
    tokenizer = Tokenizer.from_dir(model_dir(model))
    _ = tokenizer.length_bound  # computed once, here in a thread, not on a request's event loop
    return tokenizer


def load_vision(model: str) -> VisionFamily | None:
    """The model's vision family (placeholder tokens per image size), None for a text
    model. Judged from config.json's architectures first, so a text model's gateway
    never imports the multimodal stack."""
    from rtpllm.models.config import VISION_ARCHITECTURES

    root = model_dir(model)
    config_path = root / "config.json"
    raw = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if not any(arch in VISION_ARCHITECTURES for arch in raw.get("architectures") or ()):
        return None
    from rtpllm.models.config import ModelConfig
    from rtpllm.multimodal.families import load_vision_family

    return load_vision_family(root, ModelConfig.from_dir(root))


def media_settings(settings: GatewaySettings, max_payload: int) -> MediaSettings:
    """The image flags, with the per-image byte cap lowered to what one NATS message
    carries: a larger image could never reach an engine, so it is refused while it is
    read rather than after it was fetched and decoded."""
    media = MediaSettings(
        allowed_domains=settings.allowed_media_domains,
        allowed_networks=settings.allowed_media_networks,
        local_media_path=settings.allowed_local_media_path,
        max_images=settings.max_images_per_request,
        max_pixels=settings.max_image_pixels,
        max_bytes=settings.max_image_bytes,
        fetch_timeout_s=settings.media_fetch_timeout_s,
    )
    if max_payload and media.max_bytes > max_payload:
        media = replace(media, max_bytes=max_payload)
    return media


def test_hooks_enabled() -> bool:
    """RTPLLM_TEST_HOOKS=1 adds routes that only tests need (POST /debug/block_loop)."""
    return os.environ.get("RTPLLM_TEST_HOOKS", "") == "1"


def _log_auth(settings: GatewaySettings, keys: APIKeys) -> None:
    if keys:
        guarded = "every path but /health and /ready" if settings.protect_metrics else "/v1/* (/metrics and /instances open)"
        log.info("API keys: %d; %s need one", len(keys), guarded)
    elif settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no API key (--api-key / --api-key-file): anyone who reaches %s:%d can use the API", settings.host, settings.port)
    else:
        log.info("no API key: the API is open to local clients")


def _log_tools(server: OpenAIServer, flag: str) -> None:
    """Which format tool calls are read in; a warning when the template shows the model
    no tools (SmolLM2's): clients must then describe them in a message themselves."""
    template = server.tokenizer.chat_template or ""
    log.info("tool calls: %s parser (--tool-call-parser %s)", server.tool_parser.name, flag)
    if template and "tools" not in template:
        log.warning("the chat template does not render tools: requests' tools are not shown to the model")


def create_app(settings: GatewaySettings) -> FastAPI:
    gateway_id = settings.gateway_id or new_id("gateway")
    model = served_model_name(settings.model, settings.served_model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Tokenizer first: on a first run it may convert the embedded model (seconds).
        tokenizer = await asyncio.to_thread(load_tokenizer, settings.model)
        vision = await asyncio.to_thread(load_vision, settings.model)
        redis = RedisCheck(settings.redis_url)
        if settings.redis_url:
            log.info("redis %s: %s", redact_url(settings.redis_url), await redis.status())
        nc = await connect_nats(settings.nats, f"rtpllm-{gateway_id}", settings.nats_connect_timeout_s)
        dispatcher = Dispatcher(
            nc,
            make_policy(
                settings.router, PrefixIndex(), settings.router_queue_tokens, settings.router_host_credit
            ),
            DispatcherConfig(
                gateway_id=gateway_id,
                submit_timeout_s=settings.submit_timeout_s,
                heartbeat_interval_s=settings.heartbeat_interval_s,
                lease_s=settings.lease_s,
                max_predicted_ttft_s=settings.max_predicted_ttft_s,
            ),
        )
        admission = AdmissionController(settings.max_running, settings.max_queue, settings.retry_after_s)
        visions = VisionRegistry(dispatcher.watch.clock)  # vision services' heartbeats, for /metrics
        await visions.start(nc)
        metrics = GatewayMetrics(admission, dispatcher.registry, visions, model)
        dispatcher.on_instance_lost = lambda inst, code: metrics.instances_lost.labels(code).inc()
        dispatcher.on_routed = lambda policy, reason: metrics.routing_decisions.labels(policy, reason).inc()
        await dispatcher.start()
        core = GatewayCore(dispatcher, admission, metrics, settings.request_timeout_s)
        stats = StatsLogger(metrics, admission, dispatcher.registry, settings.stats_interval_s, model)
        stats.start()
        media = media_settings(settings, nc.max_payload)
        if vision is not None:
            log.info(
                "images (%s): at most %d per request, %d bytes and %d pixels each; fetched from %s",
                vision.name,
                media.max_images,
                media.max_bytes,
                media.max_pixels,
                ", ".join(media.allowed_domains) or "no domain (data: URLs only)",
            )
            if media.max_bytes < settings.max_image_bytes:
                log.warning(
                    "--max-image-bytes %d is above the NATS server's max_payload %d: images are capped at %d bytes "
                    "(raise max_payload in the NATS server's configuration for larger ones)",
                    settings.max_image_bytes,
                    nc.max_payload,
                    media.max_bytes,
                )
        images = ImageLoader(media, model, vision)
        app.state.server = OpenAIServer(
            core, tokenizer, model, settings.max_body_bytes, images, settings.tool_call_parser
        )
        _log_tools(app.state.server, settings.tool_call_parser)
        app.state.nc = nc
        app.state.redis = redis
        log.info(
            "gateway %s serving %r on http://%s:%d (router %s)",
            gateway_id,
            model,
            settings.host,
            settings.port,
            settings.router,
        )
        _log_auth(settings, keys)
        try:
            yield
        finally:
            await stats.close()
            await dispatcher.close()
            await visions.close()
            await images.aclose()
            await redis.close()
            await nc.drain()

    app = FastAPI(title="rtpllm gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    describe_request_bodies(
        app,
        {
            "/v1/chat/completions": ChatCompletionRequest,
            "/v1/completions": CompletionRequest,
            # /tokenize also takes TokenizeChatRequest's `messages`; the fuzzer gets the prompt form.
            "/tokenize": TokenizeCompletionRequest,
            "/detokenize": DetokenizeRequest,
        },
    )
    # A request without a valid key reaches no route and reads no body.
    keys = APIKeys(settings.api_keys)
    app.add_middleware(APIKeyMiddleware, keys=keys, open_paths=open_paths(settings.protect_metrics))
    if settings.access_log:
        app.add_middleware(AccessLogMiddleware)  # outermost: refused requests are logged too

    def server(request: Request) -> OpenAIServer:
        return request.app.state.server

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await server(request).chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server(request).completions(request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return server(request).models()

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(request: Request, model_id: str) -> Response:
        return server(request).retrieve_model(model_id)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await server(request).tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await server(request).detokenize(request)

    @app.get("/version")
    async def version(request: Request) -> Response:
        return server(request).version()

    @app.get("/health")
    async def health() -> Response:
        """Liveness: the process serves HTTP."""
        return json_response({"status": "ok"})

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        """Readiness: NATS connected and at least one worker serves the model."""
        srv = server(request)
        workers = srv.core.dispatcher.candidates(srv.model)
        prefill = srv.core.dispatcher.registry.candidates(srv.model, (InstanceRole.PREFILL,))
        nats_ok = request.app.state.nc.is_connected
        body = {
            "status": "ready" if nats_ok and workers else "not_ready",
            "gateway_id": gateway_id,
            "model": srv.model,
            "workers": len(workers),  # instances taking requests: combined workers and decode instances
            "prefill": len(prefill),
            "dependencies": {
                "nats": "ok" if nats_ok else "disconnected",
                "redis": await request.app.state.redis.status(),
            },
        }
        return json_response(body, 200 if body["status"] == "ready" else 503)

    @app.get("/instances")
    async def instances(request: Request) -> Response:
        """Every engine instance this gateway knows, with its last reported load."""
        srv = server(request)
        items = []
        for inst in srv.core.dispatcher.registry:
            hb = inst.heartbeat
            items.append(
                {
                    "instance_id": hb.instance_id,
                    "role": hb.role,
                    "model": hb.model,
                    "state": hb.state,
                    "heartbeat_seq": hb.seq,
                    "max_model_len": hb.max_model_len,
                    "inflight_from_this_gateway": inst.inflight,
                    "cached_blocks": srv.core.dispatcher.index.num_keys(hb.instance_id),
                    "host_cached_blocks": srv.core.dispatcher.index.num_host_keys(hb.instance_id),
                    # Its host's kvstore, whose host-tier blocks routing credits to it too.
                    "kvstore_host": hb.kvstore_host or None,
                    "kvstore_cached_blocks": (
                        srv.core.dispatcher.index.num_host_keys(subjects.kvstore_events_id(hb.kvstore_host))
                        if hb.kvstore_host
                        else 0
                    ),
                    "load": {f: getattr(hb.load, f) for f in hb.load.__struct_fields__},
                    "disaggregation": msgspec.to_builtins(hb.disagg) if hb.disagg is not None else None,
                }
            )
        return json_response({"instances": items})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        registry = server(request).core.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if test_hooks_enabled():
        log.warning("RTPLLM_TEST_HOOKS=1: test-only routes are enabled (POST /debug/block_loop)")

        @app.post("/debug/block_loop")
        async def block_loop(seconds: float = 1.0) -> Response:
            """Block the event loop for `seconds` (at most 60), as a slow parse would: the
            liveness tests check that no worker is lost for good meanwhile."""
            seconds = min(max(seconds, 0.0), 60.0)
            time.sleep(seconds)  # on purpose: the whole loop stops
            return json_response({"blocked_s": seconds})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(errors.not_found(request.url.path))
        return error_response(APIError(exc.status_code, str(exc.detail), "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(errors.bad_request(str(exc)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(errors.internal(f"internal error: {type(exc).__name__}"))

    return app
