"""The GenericRAG seed's embedding endpoints: one image, a batch, texts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request

from imgembed.api.inputs import (
    body_spec,
    check_count,
    embed_inputs,
    invalid_body,
    one_image,
    parse_body,
    read_upload,
    sources_or_errors,
)
from imgembed.api.schemas import (
    BatchRequest,
    BatchResponse,
    EmbeddingResult,
    ImageRequest,
    TextRequest,
    TextResponse,
)
from imgembed.api.state import State
from imgembed.errors import ImgEmbedError
from imgembed.results import ImageEmbeddingResult

router = APIRouter(prefix="/api/v1/embeddings", tags=["embeddings"])


def result_dict(result: ImageEmbeddingResult, include_metadata: bool) -> dict[str, Any]:
    """Metadata only when asked; a debug-mode server's steps always (as in the library)."""
    out = result.to_dict()
    if not include_metadata:
        steps = (out["metadata"] or {}).get("debug_logs")
        out["metadata"] = {"debug_logs": steps} if steps is not None else None
    return out


@router.post(
    "/image",
    response_model=EmbeddingResult,
    openapi_extra=body_spec(ImageRequest, uploads="file"),
    summary="Embed one image (path, URL, base64 or an uploaded file)",
)
async def embed_image(request: Request, state: State) -> dict[str, Any]:
    body, uploads = await parse_body(request, ImageRequest, state.settings, "file")
    given = (body.image_path, body.image_url, body.image_base64)
    if sum(value is not None for value in given) + len(uploads) != 1:
        raise invalid_body(
            "give exactly one image: image_path, image_url, image_base64 or a file upload"
        )
    batcher = state.batcher()
    source, label = await one_image(uploads, given, state.settings)
    result = await batcher.embed_image(
        source, labels=[label], extended=body.extended, normalize=body.normalize
    )
    if result.error is not None:
        raise result.error
    return result_dict(result, body.include_metadata)


@router.post(
    "/image/batch",
    response_model=BatchResponse,
    openapi_extra=body_spec(BatchRequest, uploads="files"),
    summary="Embed many images; a bad one is an item with `error`, never a failed request",
)
async def embed_batch(request: Request, state: State) -> dict[str, Any]:
    started = time.perf_counter()
    body, uploads = await parse_body(request, BatchRequest, state.settings, "files")
    count = len(body.image_paths) + len(body.images) + len(uploads)
    if not count:
        raise invalid_body("give at least one image: image_paths, images or file uploads")
    check_count(count, state.settings)
    batcher = state.batcher()
    sources, labels = await asyncio.to_thread(
        sources_or_errors, state.settings, body.image_paths, body.images
    )
    for upload in uploads:
        try:
            data, name = await read_upload(upload, state.settings)
            sources.append(data)
        except ImgEmbedError as exc:
            name = upload.filename or "upload"
            sources.append(exc)
        labels.append(name)
    results = await embed_inputs(
        batcher, sources, labels, extended=body.extended, normalize=body.normalize
    )
    ok = sum(result.ok for result in results)
    return {
        "results": [result_dict(result, body.include_metadata) for result in results],
        "successful": ok,
        "failed": len(results) - ok,
        "model_name": str(batcher.pipeline.encoder.ref),
        "processing_time": time.perf_counter() - started,
    }


@router.post("/text", response_model=TextResponse, summary="Embed texts into the images' space")
async def embed_texts(body: TextRequest, state: State) -> dict[str, Any]:
    started = time.perf_counter()
    check_count(len(body.texts), state.settings)
    batcher = state.batcher()
    vectors = await batcher.embed_texts(body.texts)
    return {
        "embeddings": vectors.tolist(),
        "dimension": int(vectors.shape[1]),
        "model_name": str(batcher.pipeline.encoder.ref),
        "normalized": batcher.normalize,
        "processing_time": time.perf_counter() - started,
    }
