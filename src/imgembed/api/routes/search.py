"""Similarity search: the seed's candidates, or a store collection with metadata filters."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from imgembed.api.errors import NotFoundError
from imgembed.api.inputs import (
    body_spec,
    check_count,
    embed_inputs,
    invalid_body,
    one_image,
    parse_body,
    sources_or_errors,
)
from imgembed.api.schemas import SearchRequest, SearchResponse
from imgembed.api.state import AppState, State
from imgembed.engine.batcher import Batcher
from imgembed.errors import CollectionNotFoundError, ConfigurationError, error_dict
from imgembed.models.registry import ModelRef
from imgembed.results import SimilarityResult
from imgembed.service import ImageEmbeddingService, checked_search_text

router = APIRouter(prefix="/api/v1/search", tags=["search"])


@router.post(
    "/image",
    response_model=SearchResponse,
    openapi_extra=body_spec(SearchRequest, uploads="file"),
    summary="Most similar images: among candidates, or in a collection",
)
async def search_image(request: Request, state: State) -> dict[str, Any]:
    started = time.perf_counter()
    body, uploads = await parse_body(request, SearchRequest, state.settings, "file")
    queries = [body.query_image_path, body.query_image_url, body.query_image_base64,
               body.query_text, body.query_id]  # fmt: skip
    if sum(query is not None for query in queries) + len(uploads) != 1:
        raise invalid_body(
            "give exactly one query: query_image_path, query_image_url, query_image_base64, "
            "query_text, query_id or a file upload"
        )
    if body.query_text is not None:
        try:  # before any lookup: the request itself is wrong, like a missing field
            checked_search_text(body.query_text)
        except ConfigurationError as exc:
            raise invalid_body(str(exc)) from exc
    failed: list[dict[str, str]] = []
    collection = None
    if body.searches_candidates:
        if body.filters or body.query_id is not None:
            raise invalid_body("filters and query_id apply to a collection")
        batcher = state.batcher()
        hits, failed = await _among_candidates(batcher, body, uploads, state)
        model = batcher.pipeline.encoder.ref
    else:
        collection = body.collection or state.settings.collection
        try:
            hits, model = await _in_collection(body, uploads, state, collection)
        except CollectionNotFoundError as exc:
            if body.collection is not None:
                raise
            # the seed's requests name candidates: one without them searched the default
            what = (
                "a collection (query_id and filters search one)"
                if body.query_id is not None or body.filters
                else "candidate_image_paths or candidate_images to search among those "
                "images, or a collection"
            )
            raise CollectionNotFoundError(
                f"{exc} (the server's default collection, searched as the request names no "
                f"collection): give {what}"
            ) from exc
    return {
        "results": [vars(hit) for hit in hits],
        "failed": failed,
        "collection": collection,
        "model_name": str(model),
        "processing_time": time.perf_counter() - started,
    }


async def _in_collection(
    body: SearchRequest, uploads: list[Any], state: AppState, collection: str
) -> tuple[list[SimilarityResult], ModelRef]:
    service = await state.in_store(state.service.for_collection, collection)
    if body.query_id is not None:
        vector = await state.in_store(_stored_vector, service, collection, body.query_id)
    else:
        vector = await _query_vector(await state.batcher_for(service), body, uploads, state)
    hits = await state.in_store(
        service.search_vector,
        vector,
        collection,
        body.top_k,
        body.filters,
        include_embeddings=body.include_embeddings,
    )
    return hits, service.model_ref


async def _query_vector(
    batcher: Batcher, body: SearchRequest, uploads: list[Any], state: AppState
) -> np.ndarray:
    if body.query_text is not None:
        return (await batcher.embed_texts([body.query_text]))[0]
    given = (body.query_image_path, body.query_image_url, body.query_image_base64)
    source, label = await one_image(uploads, given, state.settings)
    result = await batcher.embed_image(source, labels=[label])
    if result.error is not None:
        raise result.error  # the query itself is unusable: the request fails
    return result.embedding


async def _among_candidates(
    batcher: Batcher, body: SearchRequest, uploads: list[Any], state: AppState
) -> tuple[list[SimilarityResult], list[dict[str, str]]]:
    """The seed's search: embed the query and the candidates, rank the candidates; an
    unusable candidate is listed in `failed` and the others are still ranked."""
    paths, images = body.candidate_image_paths or [], body.candidate_images or []
    check_count(len(paths) + len(images) + 1, state.settings)
    query, (sources, labels) = await asyncio.gather(
        _query_vector(batcher, body, uploads, state),
        asyncio.to_thread(sources_or_errors, state.settings, paths, images),
    )
    results = await embed_inputs(batcher, sources, labels)
    good = [result for result in results if result.ok]
    failed = [{"image_path": r.image_path, **error_dict(r.error)} for r in results if r.error]
    if not good:
        return [], failed
    ranked = state.service.similar_images(query, np.stack([r.embedding for r in good]), body.top_k)
    hits = [
        dataclasses.replace(
            hit,
            image_path=good[hit.image_path].image_path,
            embedding=hit.embedding if body.include_embeddings else None,
            metadata=good[hit.image_path].metadata,
        )
        for hit in ranked
    ]
    return hits, failed


def _stored_vector(service: ImageEmbeddingService, collection: str, item_id: str) -> np.ndarray:
    records = service.store.get(collection, [item_id])
    if not records:
        raise NotFoundError(f"no item {item_id!r} in collection {collection!r}")
    return records[0].vector
