"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from imgembed.api.state import LOADING_RETRY_SECONDS, State

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the process answers (no key needed)")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: the model is loaded and the store answers")
async def ready(state: State) -> JSONResponse:
    checks: dict[str, Any] = await state.readiness()
    ok = all(value is True for value in checks.values())
    body = {"status": "ready" if ok else "not ready", **checks}
    if ok:
        return JSONResponse(body)
    # worth asking again soon while the model loads or the store restarts; a model that
    # failed to load stays failed
    failed = str(checks["model"]).startswith("failed")
    wait = {} if failed else {"Retry-After": str(round(LOADING_RETRY_SECONDS))}
    return JSONResponse(body, 503, headers=wait)


# HEAD too: load balancers and uptime checks often probe with it (it was a 405)
router.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/ready", ready, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
