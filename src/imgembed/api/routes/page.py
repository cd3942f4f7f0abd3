"""The search page: static HTML, CSS and JavaScript shipped in the package (no build step,
nothing from a CDN), talking to the JSON API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from imgembed.api.errors import NotFoundError

STATIC = Path(__file__).resolve().parent.parent / "static"
FILES = {"app.js": "text/javascript", "products.js": "text/javascript", "style.css": "text/css"}

router = APIRouter(tags=["page"], include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    if name not in FILES:
        raise NotFoundError(f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=FILES[name])
