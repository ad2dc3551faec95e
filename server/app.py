"""Builds the app. Nothing heavy happens at import: the model, SAE and adapters load in the
lifespan, and live in the state it yields (requests reach it through `deps.StateDep`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import fsrl
from fsrl.errors import FsrlError
from server.deps import ApiKeyGuard
from server.http_errors import ERROR_RESPONSES, BodySizeLimit, install_error_handlers
from server.metrics import RequestMetricsMiddleware
from server.routes import adapters, features, generate, health, openai, playground
from server.settings import Settings
from server.canary import run_canary
from server.state import start_state

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict]:
        try:
            state = await start_state(settings)
        except FsrlError as exc:
            app.state.startup_error = str(exc)  # for `fsrl serve` to report in one line
            raise
        try:
            await run_canary(state)  # steering shown to happen before the server says healthy
        except BaseException as exc:
            state.close()
            if isinstance(exc, FsrlError):
                app.state.startup_error = str(exc)
            raise
        log.info("serving %s with SAE %s at %s on %s; %d adapter(s) from %s",
                 state.base.name, state.sae.info.name, state.site, state.base.device,
                 len(state.registry), state.registry.root)
        try:
            yield {"fsrl": state}
        finally:
            state.close()

    app = FastAPI(title="fsrl", version=fsrl.__version__, lifespan=lifespan, responses=ERROR_RESPONSES,
                  description="Steering inference server: a frozen LM steered in SAE feature space.")
    install_error_handlers(app)
    # Outermost last: the counter sees every answer, then the key check, then the size limit.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(ApiKeyGuard, settings=settings)
    app.add_middleware(RequestMetricsMiddleware)
    for router in (health.open_router, health.router, generate.router, adapters.router, features.router,
                   openai.router, playground.router):
        app.include_router(router)
    return app
