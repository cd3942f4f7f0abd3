"""The product catalogue per store (imgembed.catalog): upsert products, embed them (a
background job), search by text, image or both with the score of each part, statistics, and
product thumbnails for the page. Catalogue calls block, so these are plain functions run in
FastAPI's thread pool, except search, which reads an upload first."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from imgembed.api.errors import NotFoundError
from imgembed.api.inputs import body_spec, invalid_body, one_image, parse_body
from imgembed.api.jobs import job_key
from imgembed.api.schemas import ProductSearchRequest, ProductsRequest, StoreEmbedRequest
from imgembed.api.state import AppState, State
from imgembed.api.thumbnails import thumbnail_response
from imgembed.catalog import Catalog
from imgembed.catalog.jobs import EmbedStats, NoEvents
from imgembed.engine.pipeline import Progress, ProgressCallback
from imgembed.errors import (
    ImageError,
    ProductNotFoundError,
    ProvenanceMismatchError,
    StoreBusyError,
    error_dict,
)

router = APIRouter(prefix="/api/v1/stores", tags=["products"])


@router.get("", summary="Stores that have products, with their product counts")
def stores(state: State) -> list[dict[str, Any]]:
    repository = state.catalog().repository
    return [{"store_id": s, "products": repository.count(s)} for s in repository.stores()]


@router.post(
    "/{store_id}/products",
    summary="Upsert products (flat or Shopify objects); then embed those of them that need it",
)
def upsert_products(store_id: str, body: ProductsRequest, state: State) -> dict[str, Any]:
    """A product needs embedding when it is new or changed, and also when an earlier embed
    failed or never ran (refused, stopped): sending the same products again embeds those."""
    catalog = state.catalog(store_id)
    report = catalog.upsert_products(store_id, body.products)
    answer: dict[str, Any] = {"import": report.to_dict(), "job": None}
    if body.embed and report.product_ids:
        only = StoreEmbedRequest(product_ids=report.product_ids)
        try:
            answer["job"] = _embed_job(state, catalog, store_id, only, none_if_done=True)
        except (ProvenanceMismatchError, StoreBusyError) as exc:
            # the products are stored; why they are not embedded now (other models: POST
            # .../embed with mode force; another process's job: POST .../embed after it)
            answer["embed_error"] = error_dict(exc)
    return answer


@router.post(
    "/{store_id}/embed",
    status_code=202,
    summary="Embed the store's products that need it, as a background job (resumable)",
)
def embed(store_id: str, body: StoreEmbedRequest, state: State) -> dict[str, Any]:
    return _embed_job(state, state.catalog(store_id), store_id, body)


def _embed_job(
    state: AppState,
    catalog: Catalog,
    store_id: str,
    body: StoreEmbedRequest,
    none_if_done: bool = False,
) -> dict[str, Any] | None:
    def run(progress: ProgressCallback) -> EmbedStats:
        return catalog.embed(
            store_id,
            batch_size=body.batch_size,
            mode=body.mode,
            product_ids=body.product_ids,
            events=_JobEvents(progress),
        )

    # 404 (no such store or product) or 409 (other models; another process embeds the
    # store) before a job starts; behind a job of this server's the new one just queues
    own = state.jobs.active("catalog-embed", store_id)
    total = catalog.embed_total(store_id, body.product_ids, body.mode, check_busy=not own)
    if none_if_done and not total:
        return None
    resume = (
        f'POST /api/v1/stores/{store_id}/embed with mode "changed": it embeds what this run '
        "did not (also after a forced run)"
    )
    key = job_key("catalog-embed", store_id, body.model_dump(mode="json"))
    job = state.jobs.submit("catalog-embed", store_id, total, run, resume, key)
    return {"job_id": job.id, "status": job.status, "total": total,
            "url": f"/api/v1/jobs/{job.id}"}  # fmt: skip


class _JobEvents(NoEvents):
    """A run's batches as job progress; the job stops (cancelled, or on shutdown) at a batch
    boundary, or within a second while the run waits on the database."""

    def __init__(self, progress: ProgressCallback):
        self.progress = progress
        self.stats: EmbedStats | None = None

    def started(self, stats: EmbedStats) -> None:
        self.stats = stats
        self._report(stats)

    def batch_done(self, stats: EmbedStats) -> None:
        self._report(stats)

    def waiting(self, what: str) -> None:
        if self.stats is not None:  # the same progress again: it raises if the job stops
            self._report(self.stats, what)

    def _report(self, stats: EmbedStats, waiting: str = "") -> None:
        # "embedded": products with an image embedded (what the image metrics count); those
        # without one are done, and counted in the run's statistics
        images = stats.successful - stats.text_only
        done, failed = stats.processed, stats.failed
        self.progress(Progress(stats.to_process, done, images, 0, failed, waiting=waiting))


@router.post(
    "/{store_id}/search",
    openapi_extra=body_spec(ProductSearchRequest, uploads="file"),
    summary="Products for a text, an image, or both, with per-part scores",
)
async def search(store_id: str, request: Request, state: State) -> dict[str, Any]:
    started = time.perf_counter()
    body, uploads = await parse_body(request, ProductSearchRequest, state.settings, "file")
    if len(uploads) > 1 or (uploads and body.image_given):
        raise invalid_body("give at most one image: a path, a URL, base64 or a file")
    image, label = None, None
    if uploads or body.image_given:
        given = (body.image_path, body.image_url, body.image_base64)
        image, label = await one_image(uploads, given, state.settings)
    text = (body.query or "").strip() or None
    if image is None and text is None:
        raise invalid_body("give a query text, an image, or both")
    catalog = await state.in_store(state.catalog, store_id)
    try:
        hits = await state.in_store(
            catalog.search,
            store_id,
            text,
            image=image,
            top_k=body.top_k,
            category=body.category,
            max_price=body.max_price,
        )
    except ImageError as exc:
        if label is not None:  # an upload: its file name, not "<20 bytes>"
            exc.source = label
        raise
    return {
        "store_id": store_id,
        "ranked_by": hits[0].ranked_by if hits else None,
        "results": [hit.to_dict() for hit in hits],
        "processing_time": time.perf_counter() - started,
    }


@router.get("/{store_id}/stats", summary="The store's products by state and category")
def stats(store_id: str, state: State) -> dict[str, Any]:
    return state.catalog().stats(store_id).to_dict()


# Ids may hold "/": this route comes first, so ".../a/b/thumbnail" is a/b's thumbnail.
@router.get(
    "/{store_id}/products/{product_id:path}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
    summary="A JPEG thumbnail of the product's image (its URL, or a file inside the roots)",
)
def thumbnail(
    store_id: str,
    product_id: str,
    state: State,
    size: Annotated[int, Query(ge=16, le=1024)] = 256,
) -> Response:
    found = _product(state, store_id, product_id)
    if not found["image_url"]:
        raise NotFoundError(f"product {product_id!r} has no image")
    return thumbnail_response(state.service, found["image_url"], size)


@router.get("/{store_id}/products/{product_id:path}", summary="One product and its embedding state")
def product(store_id: str, product_id: str, state: State) -> dict[str, Any]:
    return _product(state, store_id, product_id)


def _product(state: AppState, store_id: str, product_id: str) -> dict[str, Any]:
    found = state.catalog().product(store_id, product_id)
    if found is None:  # the library's own type, as an embed of an unknown id raises
        raise ProductNotFoundError(f"no product {product_id!r} in store {store_id!r}")
    return found
