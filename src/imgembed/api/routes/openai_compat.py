"""OpenAI-compatible embeddings (POST /v1/embeddings, GET /v1/models), so OpenAI SDK clients
work unchanged. As in infinity, an input that is an http(s) URL or a `data:image/...` URI is
an image; everything else is a text (or set the extra field `modality`; with "image", plain
base64, or a file name inside the server's allowed roots)."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter

from imgembed.api.inputs import base64_source, check_count, invalid_body, path_source, url_source
from imgembed.api.schemas import OpenAIEmbeddingRequest, OpenAIEmbeddingResponse, OpenAIModelList
from imgembed.api.state import AppState, State
from imgembed.errors import ConfigurationError, InvalidImageError, UnknownModelError
from imgembed.intake.image_input import Input
from imgembed.intake.sources import is_data_uri, is_url
from imgembed.models import registry

router = APIRouter(prefix="/v1", tags=["openai"])
STARTED = int(time.time())


@router.get("/models", response_model=OpenAIModelList, summary="The model this server embeds with")
async def models(state: State) -> dict[str, Any]:
    service = state.service
    ref = service.model_ref
    entry = {"id": ref.name, "created": STARTED, "owned_by": "imgembed",
             "dimension": service.dimension, "pretrained": ref.pretrained}  # fmt: skip
    return {"data": [entry]}


@router.post("/embeddings", response_model=OpenAIEmbeddingResponse, summary="OpenAI embeddings")
async def embeddings(body: OpenAIEmbeddingRequest, state: State) -> dict[str, Any]:
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise invalid_body("input is empty: give a string or a list of strings")
    if not all(isinstance(item, str) for item in inputs):
        raise invalid_body("input must be a string or a list of strings (no token arrays)")
    check_count(len(inputs), state.settings)
    service = state.service
    ref = service.model_ref
    if body.model != str(ref) and registry.resolve(body.model, ref.pretrained) != ref:
        raise UnknownModelError(
            f"model {body.model!r} is not served here; GET /v1/models lists {ref.name!r}"
        )
    if body.dimensions is not None and body.dimensions != service.dimension:
        raise ConfigurationError(
            f"{ref.name} embeds in {service.dimension} dimensions; dimensions="
            f"{body.dimensions} would need truncation, which CLIP vectors do not support"
        )
    batcher = state.batcher()
    kinds = [_is_image(item, body.modality) for item in inputs]  # type: ignore[arg-type]
    images = [n for n, image in enumerate(kinds) if image]
    texts = [n for n, image in enumerate(kinds) if not image]
    vectors: list[np.ndarray | None] = [None] * len(inputs)
    if images:
        sources = await asyncio.to_thread(
            lambda: [_image(inputs[n], n, state) for n in images]  # type: ignore[arg-type]
        )
        labels = [f"input {n}" for n in images]  # not "<3 bytes>": which of the list it was
        results = await batcher.embed_images(sources, labels=labels)
        for n, result in zip(images, results, strict=True):
            if result.error is not None:
                raise result.error  # OpenAI's API has no per-item errors
            vectors[n] = result.embedding
    tokens = 0
    if texts:
        strings: list[str] = [inputs[n] for n in texts]  # type: ignore[misc]
        encoded = await batcher.embed_texts(strings)
        for n, vector in zip(texts, encoded, strict=True):
            vectors[n] = vector
        tokens = sum(await asyncio.to_thread(service.count_tokens, strings))
    data = [
        {"index": n, "embedding": _encode(vector, body.encoding_format)}
        for n, vector in enumerate(vectors)
    ]
    # The tokens the model read (a text is cut at its context length); images have none.
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"data": data, "model": ref.name, "usage": usage}


def _is_image(item: str, modality: str | None) -> bool:
    if modality is not None:
        return modality == "image"
    return is_url(item) or item[:11].lower() == "data:image/"


def _image(item: str, n: int, state: AppState) -> Input:
    if is_url(item):
        return url_source(item)
    if is_data_uri(item):
        return item  # decoded by the intake, in a worker thread
    try:
        return base64_source(item, state.settings)  # modality "image" with plain base64
    except InvalidImageError as exc:
        # '.' is not base64: a name with an image suffix is a file, as on the other routes
        if Path(item).suffix.lower() not in state.settings.supported_formats:
            exc.source = f"input {n}"
            raise
        return path_source(item, state.settings)


def _encode(vector: Any, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what OpenAI's SDKs ask for by default
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return np.asarray(vector, dtype=np.float32).tolist()
