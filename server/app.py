"""`build_app(config, engine)`: the FastAPI application over an AsyncEngine."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from jaxllm.config import EngineConfig
from jaxllm.engine_client import EngineClient

from . import admin, native, openai_chat, openai_completions, openai_responses
from .errors import install_exception_handlers
from .metrics import ServerMetrics
from .middleware import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
)
from .server_config import ServerConfig
from .serving import ServingContext

logger = logging.getLogger(__name__)


def build_app(config: EngineConfig, engine: EngineClient | None = None,
              server_config: ServerConfig | None = None) -> FastAPI:
    """The app. With `engine=None` the lifespan builds one from `config` (and shuts it down);
    a given engine is served as is and drained, but not shut down, on exit."""
    server_config = server_config or ServerConfig()
    owns_engine = engine is None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine
        if eng is None:
            from jaxllm.dp_engine import create_async_engine  # one engine, DP or multi-host

            eng = await create_async_engine(config)
            app.state.ctx = ServingContext(eng, config, server_config, ServerMetrics(eng))
            app.state.metrics_holder["metrics"] = app.state.ctx.metrics
            if server_config.freeze_gc:
                gc.collect()
                gc.freeze()  # (ServerConfig.freeze_gc)
        try:
            yield
        finally:
            logger.info("draining in-flight requests (up to %.0f s)", server_config.drain_timeout_s)
            try:
                await eng.wait_for_requests_to_drain(server_config.drain_timeout_s)
            except Exception:  # noqa: BLE001 -- shutting down anyway
                logger.warning("requests did not drain before shutdown", exc_info=True)
            if owns_engine:
                await eng.shutdown()

    docs = not config.disable_fastapi_docs
    app = FastAPI(title="jaxllm", lifespan=lifespan, root_path=config.root_path or "",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.metrics_holder = {}
    if engine is not None:  # usable before startup too (tests with ASGITransport)
        app.state.ctx = ServingContext(engine, config, server_config, ServerMetrics(engine))
        app.state.metrics_holder["metrics"] = app.state.ctx.metrics
    for module in (admin, native, openai_completions, openai_chat, openai_responses):
        app.include_router(module.router)
    install_exception_handlers(app)

    app.add_middleware(_LazyMetricsMiddleware, holder=app.state.metrics_holder)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(RequestIdMiddleware)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_credentials=True, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-Id"])
    return app


class _LazyMetricsMiddleware:
    """MetricsMiddleware whose registry exists only once the engine does (after startup)."""

    def __init__(self, app: Any, holder: dict[str, ServerMetrics]) -> None:
        self.app = app
        self.holder = holder

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        metrics = self.holder.get("metrics")
        if metrics is None or scope["type"] != "http":
            return await self.app(scope, receive, send)
        await MetricsMiddleware(self.app, metrics)(scope, receive, send)
