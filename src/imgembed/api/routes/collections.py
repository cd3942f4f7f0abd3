"""Collections in the store: list, create (with the model's provenance), drop, index (a
background job), delete items, near-duplicates, and thumbnails of indexed local files.
Store calls block, so these routes are plain functions run in FastAPI's thread pool."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from imgembed.api.errors import NotFoundError
from imgembed.api.inputs import invalid_body, local_path
from imgembed.api.jobs import JobStatus, job_key
from imgembed.api.schemas import CollectionCreate, CollectionOut, DeleteItems, IndexRequest
from imgembed.api.state import State
from imgembed.api.thumbnails import thumbnail_response
from imgembed.errors import ModelUnavailableError
from imgembed.indexing import IndexItem, index_items
from imgembed.intake.sources import is_data_uri, is_url
from imgembed.models import registry
from imgembed.store import CollectionInfo

router = APIRouter(prefix="/api/v1", tags=["collections"])


def _info(info: CollectionInfo) -> dict[str, Any]:
    provenance = info.provenance
    try:
        text = registry.facts(provenance.model).has_text_tower
    except ModelUnavailableError:  # an architecture this version does not know
        text = False
    return {"name": info.name, "backend": info.backend, "model": provenance.model,
            "pretrained": provenance.pretrained, "dimension": provenance.dimension,
            "count": info.count, "has_text_tower": text}  # fmt: skip


@router.get("/collections", response_model=list[CollectionOut], summary="All collections")
def list_collections(state: State) -> list[dict[str, Any]]:
    return [_info(info) for info in state.service.store.collections()]


@router.post(
    "/collections",
    response_model=CollectionOut,
    status_code=201,
    summary="Create a collection for a model (201), or return it if it exists (200; 409 if "
    "it was built with another model than the one named)",
)
def create_collection(body: CollectionCreate, state: State, response: Response) -> dict[str, Any]:
    settings = state.settings
    info, created = state.service.create_collection(
        body.name, body.model, body.pretrained, settings.allowed_roots, settings.allowed_models
    )
    response.status_code = 201 if created else 200
    return _info(info)


@router.delete("/collections/{name}", summary="Drop a collection and everything in it")
def drop_collection(name: str, state: State) -> dict[str, str]:
    state.service.store.drop_collection(name)
    return {"dropped": name}


@router.post(
    "/collections/{name}/index",
    status_code=202,
    summary="Index sources into a collection as a background job (incremental, resumable)",
)
def index(name: str, body: IndexRequest, state: State) -> dict[str, Any]:
    settings = state.settings
    if not body.sources and not body.items:
        raise invalid_body("give what to index: sources (folders, files, URLs) or items")
    for source in body.sources:  # before anything reads a folder or a list file
        if not is_url(source):
            local_path(source, settings)
    named = [IndexItem(i.id or i.source, i.source, i.metadata) for i in body.items]
    items = index_items([*body.sources, *named], settings.supported_formats)
    service = state.service.for_indexing(name)
    # a CLI run in another process now: 409 at once (behind this server's own run, in any of
    # its worker processes, it queues)
    if not state.jobs.active("index", name):
        service.store.check_not_busy(name)
    job = state.jobs.submit(
        "index",
        name,
        len(items),
        lambda progress: service.index(items, name, prune=body.prune, progress=progress),
        resume="send the same request again: it adds only what is not stored yet",
        # what was listed now, too: a folder that changed meanwhile is another run
        key=job_key("index", name, body.prune, [vars(i) for i in items]),
    )
    return {"job_id": job.id, "status": job.status, "total": job.total,
            "url": f"/api/v1/jobs/{job.id}"}  # fmt: skip


@router.get("/jobs", summary="The background jobs kept here, newest first")
def jobs(
    state: State,
    status: Annotated[JobStatus | None, Query(description="only jobs in this state")] = None,
) -> dict[str, Any]:
    return {"jobs": state.jobs.shown(status)}


@router.get("/jobs/{job_id}", summary="A background job's status, progress and statistics")
def job(job_id: str, state: State) -> dict[str, Any]:
    return state.jobs.status(job_id)


@router.delete(
    "/jobs/{job_id}",
    summary="Cancel a job: a queued one at once, a running one after its current batch",
)
def cancel_job(job_id: str, state: State) -> dict[str, Any]:
    return state.jobs.cancel(job_id)


@router.delete("/collections/{name}/items", summary="Delete items by id")
def delete_items(name: str, body: DeleteItems, state: State) -> dict[str, int]:
    store = state.service.store
    store.provenance(name)  # 404 for an unknown collection
    return {"deleted": store.delete(name, body.ids)}


@router.get("/collections/{name}/duplicates", summary="Groups of near-duplicate images")
def duplicates(
    name: str,
    state: State,
    threshold: Annotated[
        float | None, Query(ge=0, le=1, description="Default: the model's.")
    ] = None,
) -> dict[str, Any]:
    found = state.service.duplicates(name, threshold)
    groups = [[{"id": i, "source": s} for i, s in group] for group in found.groups]
    return {"threshold": found.threshold, "groups": groups}


@router.get(
    "/collections/{name}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
    summary="A JPEG thumbnail of an indexed local file inside the allowed roots",
)
def thumbnail(
    name: str,
    id: str,
    state: State,
    size: Annotated[int, Query(ge=16, le=1024)] = 256,
) -> Response:
    service = state.service
    records = service.store.get(name, [id])
    if not records:
        raise NotFoundError(f"no item {id!r} in collection {name!r}")
    source = records[0].source
    if is_url(source) or is_data_uri(source):
        raise NotFoundError(f"item {id!r} is not a local file: no thumbnail is served for it")
    path = local_path(source, state.settings)  # 403 outside the allowed roots
    return thumbnail_response(service, path, size)
