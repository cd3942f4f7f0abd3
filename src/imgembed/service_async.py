"""The GenericRAG seed's async methods, mixed into ImageEmbeddingService.

They return the seed's plain shapes: a `list[float]`, or a dict when `include_metadata=True`.
The list also gives its result's fields by name (the seed's examples read
`embedding['processing_time']`, and in `debug` mode `embedding['metadata']['debug_logs']`,
while `len(embedding)` stays the dimension). They run their work in a thread, never on the
event loop. Everything they do is a sync method of
the service; this module only adapts shapes."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from imgembed.engine import similarity
from imgembed.errors import (
    ConfigurationError,
    ImgEmbedError,
    InvalidSourceError,
    SourceNotAllowedError,
)
from imgembed.intake.image_input import Input
from imgembed.intake.sources import checked_sources, decode_base64, is_url
from imgembed.results import EmbeddingList, ImageEmbeddingResult

if TYPE_CHECKING:
    from imgembed.service import ImageEmbeddingService

log = logging.getLogger("imgembed.service")

Embedding = list[float]
Candidates = Mapping[str, Sequence[float]] | np.ndarray | Sequence[Sequence[float]]


class SeedAsyncMethods:
    """Async wrappers over the sync API; only for ImageEmbeddingService."""

    async def _generate(
        self: ImageEmbeddingService, source: Input, include_metadata: bool
    ) -> Embedding | dict[str, Any]:
        result = await asyncio.to_thread(self._embed_one, source)
        return result.to_dict() if include_metadata else _as_list(result)

    async def generate_embedding_from_image_path(
        self: ImageEmbeddingService, image_path: str, include_metadata: bool = False
    ) -> Embedding | dict[str, Any]:
        return await self._generate(image_path, include_metadata)

    async def generate_embedding_from_image_bytes(
        self: ImageEmbeddingService, image_bytes: bytes, include_metadata: bool = False
    ) -> Embedding | dict[str, Any]:
        """The image's bytes only: a str given here (a path, say) is not read as a file."""
        if not isinstance(image_bytes, bytes | bytearray | memoryview):
            raise InvalidSourceError(
                f"the image's bytes are needed here, not a {type(image_bytes).__name__} "
                "(generate_embedding_from_image_path reads a file)",
                repr(image_bytes)[:200],
            )
        return await self._generate(bytes(image_bytes), include_metadata)

    async def generate_embedding_from_url(
        self: ImageEmbeddingService, url: str, include_metadata: bool = False
    ) -> Embedding | dict[str, Any]:
        """Download (with retries) and embed an http(s) URL; a path or another scheme is a
        SourceNotAllowedError (generate_embedding_from_image_path reads files)."""
        if not is_url(url):
            raise SourceNotAllowedError("only http(s) URLs are fetched", str(url)[:200])
        return await self._generate(url, include_metadata)

    async def generate_embedding_from_base64(
        self: ImageEmbeddingService, data: str | bytes, include_metadata: bool = False
    ) -> Embedding | dict[str, Any]:
        """From base64 text (also as the bytes `base64.b64encode` returns) or a
        `data:image/...;base64,` URI."""
        if isinstance(data, bytes | bytearray | memoryview):
            data = bytes(data).decode("ascii", "replace")  # not ASCII: invalid base64 below
        elif not isinstance(data, str):
            raise InvalidSourceError(
                f"base64 text is needed here, not a {type(data).__name__}", repr(data)[:200]
            )
        image_bytes = decode_base64(data, self.settings.max_file_size)
        return await self._generate(image_bytes, include_metadata)

    async def batch_generate_embeddings(
        self: ImageEmbeddingService, image_paths: Sequence[Input], include_metadata: bool = False
    ) -> list[Embedding | dict[str, Any] | None]:
        """In input order. A failed item is None, or a dict with `error` (with metadata, or in
        debug mode: its steps say where it failed)."""
        results = await asyncio.to_thread(self.embed_images, image_paths)
        for result in results:
            if result.error is not None:
                log.warning("failed %s", result.error)
        if include_metadata:
            return [result.to_dict() for result in results]
        if self.settings.debug:
            return [_as_list(result) if result.ok else result.to_dict() for result in results]
        return [_as_list(result) if result.ok else None for result in results]

    async def generate_embedding(self: ImageEmbeddingService, text: str) -> Embedding:
        """The seed's `text_service.generate_embedding(text_query)` (its example 5, text ->
        image search): the model's text embedding, in the same space as its images', so
        `find_similar_images(text_embedding, image_embeddings)` ranks the images by it."""
        vector = await asyncio.to_thread(self.embed_text, one_text(text, "generate_embedding"))
        return vector.tolist()

    async def calculate_similarities(
        self: ImageEmbeddingService,
        query_embedding: Sequence[float],
        candidate_embeddings: Sequence[Sequence[float]],
    ) -> list[float]:
        scores = await asyncio.to_thread(
            similarity.cosine_similarities, query_embedding, candidate_embeddings
        )
        return scores.tolist()

    async def calculate_cosine_similarity(
        self: ImageEmbeddingService, embedding1: Sequence[float], embedding2: Sequence[float]
    ) -> float:
        return similarity.cosine_similarity(embedding1, embedding2)

    async def find_similar_images(
        self: ImageEmbeddingService,
        query_embedding: Sequence[float],
        image_embeddings: Candidates | str,
        top_k: int = 5,
    ) -> list[tuple[str | int, float]]:
        """(key, score) best first; keys are the mapping's keys, or row numbers of a matrix.
        A string names a store collection; then keys are the images' sources."""
        if isinstance(image_embeddings, str):
            find = functools.partial(self.search_vector, collection=image_embeddings, top_k=top_k)
            hits = await asyncio.to_thread(find, query_embedding)
        else:
            hits = await asyncio.to_thread(
                self.similar_images, query_embedding, image_embeddings, top_k
            )
        return [(hit.image_path, hit.similarity_score) for hit in hits]

    async def preprocess_image(self: ImageEmbeddingService, image_path: Input) -> Image.Image:
        return await asyncio.to_thread(self.preprocess, image_path)

    async def batch_preprocess_images(
        self: ImageEmbeddingService, image_paths: Sequence[Input]
    ) -> list[Image.Image | None]:
        """In input order; an image that cannot be read is None (and logged)."""
        image_paths = checked_sources(image_paths)

        def run() -> list[Image.Image | None]:
            out: list[Image.Image | None] = []
            for path in image_paths:
                try:
                    out.append(self.preprocess(path))
                except ImgEmbedError as exc:
                    log.warning("failed %s", exc)
                    out.append(None)
            return out

        return await asyncio.to_thread(run)

    async def extract_image_metadata(
        self: ImageEmbeddingService, image_path: Input
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self.image_metadata, image_path)

    async def extract_extended_metadata(
        self: ImageEmbeddingService, image_path: Input
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self.image_metadata, image_path, True)


def one_text(text: str, method: str) -> str:
    """One text; a list (or anything else) is refused naming the method that takes a list
    (it was "embed_texts takes a list of strings", for a list of strings given to embed_text)."""
    if isinstance(text, str):
        return text
    many = " (embed_texts takes a list)" if isinstance(text, list | tuple) else ""
    raise ConfigurationError(f"{method} takes one string, not a {type(text).__name__}{many}")


def _as_list(result: ImageEmbeddingResult) -> Embedding:
    """The seed's plain list; `embedding["processing_time"]` (the seed's example 2) reads the
    result's fields."""
    return EmbeddingList(result)
