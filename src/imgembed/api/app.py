"""The FastAPI app factory: settings in, app out. Routes are thin (parse, call the engine,
format); errors become statuses in errors.py; security and logs in middleware.py.

Every module in `imgembed.api.routes` that has a `router` is included, so a new group of
endpoints (e.g. /api/v1/stores/{id}/products) is one new file there."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from imgembed.api import errors, routes
from imgembed.api.inputs import server_settings
from imgembed.api.middleware import OPEN_PATHS, RequestContext
from imgembed.api.state import AppState
from imgembed.config import Settings, load_settings
from imgembed.service import ImageEmbeddingService
from imgembed.store import embedded

DESCRIPTION = """Exact CLIP image and text embeddings, dynamic batching, similarity search.

Local paths are accepted only inside `IMGEMBED_ALLOWED_ROOTS`; with `IMGEMBED_API_KEYS` set,
send `Authorization: Bearer <key>`. Errors are `{"error", "error_type", "request_id"}`."""


DOCS_STATIC = "/docs-static"


def routers() -> list[APIRouter]:
    found = []
    for module in sorted(pkgutil.iter_modules(routes.__path__), key=lambda m: m.name):
        imported = importlib.import_module(f"{routes.__name__}.{module.name}")
        router = getattr(imported, "router", None)
        if isinstance(router, APIRouter):
            found.append(router)
    return found


def create_app(settings: Settings | None = None) -> FastAPI:
    """An app over one service built from `settings` (default: IMGEMBED_* variables). The
    model loads in the background at startup; /ready tells when it is done."""
    settings = server_settings(settings or load_settings())
    state = AppState(settings, ImageEmbeddingService(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        yield
        await state.close()  # after the server has finished the requests in flight
        if threading.current_thread() is threading.main_thread():  # a server process (not a
            # test's server thread), which uvicorn ends by re-raising SIGTERM: no exit handlers
            await asyncio.to_thread(embedded.let_go)

    # /docs: Swagger UI with its script and styles served from the wheel, not a CDN (one
    # docs page is enough: no ReDoc)
    app = FastAPIOffline(title="imgembed", description=DESCRIPTION, version="0.1.0",
                         lifespan=lifespan, redoc_url=None, static_url=DOCS_STATIC)  # fmt: skip
    app.state.imgembed = state
    if settings.api_keys:
        _declare_bearer(app)
    errors.install(app)
    ours = routers()
    for router in ours:
        app.include_router(router)
    routes = [route for router in ours for route in router.routes]  # full paths, flat
    app.add_middleware(RequestContext, settings=settings, metrics=state.metrics, routes=routes)
    if settings.cors_origins:  # off unless asked for; outermost, so preflights need no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    return app


def _declare_bearer(app: FastAPI) -> None:
    """The schema says what the middleware asks for: a bearer key on every route but the
    open ones, so clients and /docs ("Authorize") know to send it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            scheme = {"type": "http", "scheme": "bearer", "description": "one of IMGEMBED_API_KEYS"}
            schema.setdefault("components", {})["securitySchemes"] = {"APIKey": scheme}
            schema["security"] = [{"APIKey": []}]
            for path in OPEN_PATHS:
                for operation in schema["paths"].get(path, {}).values():
                    operation["security"] = []
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def app_from_env() -> FastAPI:
    """For `uvicorn --factory` (each worker process builds its app from the environment)."""
    return create_app()
