"""ImageEmbeddingService: the library facade, with the GenericRAG seed's method names.

Sync methods (`embed_image(s)`, `embed_text(s)`) return NumPy arrays and result objects;
the seed's async methods (service_async.py) return its plain shapes and run their work in a
thread, never on the event loop. Policy that every surface shares lives here: which model
searches a collection, near-duplicate thresholds, provenance checks."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgembed import indexing
from imgembed.config import Settings, load_settings
from imgembed.engine import similarity
from imgembed.engine.cache import EmbeddingCache
from imgembed.engine.pipeline import ImagePipeline, ProgressCallback, finite_rows
from imgembed.errors import (
    CollectionNotFoundError,
    ConfigurationError,
    EncodeError,
    ImgEmbedError,
    ProvenanceMismatchError,
    SourceNotAllowedError,
)
from imgembed.indexing import IndexItem, IndexStats, index_items
from imgembed.indexing.duplicates import find_duplicates
from imgembed.intake.image_input import Input, Intake
from imgembed.intake.sources import check_allowed, checked_sources
from imgembed.models import registry
from imgembed.models.runtime import Encoder, create_encoder
from imgembed.results import Duplicates, ImageEmbeddingResult, SimilarityResult
from imgembed.service_async import Candidates, SeedAsyncMethods, one_text
from imgembed.store import CollectionInfo, Provenance, VectorStore, open_store

Filters = Mapping[str, Any] | None


class ImageEmbeddingService(SeedAsyncMethods):
    """Embeds images and texts into one CLIP space.

    Built from `Settings`, a seed-style config dict (`{"model_name": ..., "use_gpu": ...}`)
    and/or keyword overrides; anything not given comes from IMGEMBED_* environment variables.
    The model loads on first use and is shared by every service in the process."""

    def __init__(self, config: Settings | dict[str, Any] | None = None, **overrides: Any):
        self.settings = load_settings(config, **overrides)
        explicit = "pretrained" in self.settings.model_fields_set
        self.model_ref = registry.resolve(self.settings.model, self.settings.pretrained, explicit)
        self.model_facts = registry.facts(self.model_ref.name)
        if self.model_facts.dimension is not None:  # else known only once loaded
            self._check_dimension(self.model_facts.dimension)
        if self.model_facts.image_size is not None:  # now, not on the first image
            self._check_image_size(self.model_facts.image_size)
        self.intake = Intake(self.settings)
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()  # opening the store never waits on a model load
        self._encoder: Encoder | None = None
        self._pipeline: ImagePipeline | None = None
        self._cache: EmbeddingCache | None = None
        self._store: VectorStore | None = None
        self._parent: ImageEmbeddingService | None = None  # whose store a sibling uses
        self._siblings: dict[tuple[str, str], ImageEmbeddingService] = {}

    def _check_dimension(self, actual: int) -> None:
        wanted = self.settings.dimension
        if wanted is not None and wanted != actual:
            raise ConfigurationError(
                f"configured dimension {wanted} does not match {self.model_ref}, which produces "
                f"{actual}-d embeddings; set IMGEMBED_DIMENSION/CLIP_DIMENSION={actual} or "
                "choose another model"
            )

    def _check_image_size(self, size: tuple[int, int]) -> None:
        wanted = self.settings.image_size
        if wanted is not None and (wanted, wanted) != size:
            raise ConfigurationError(
                f"image_size {wanted} cannot be honoured: {self.model_ref} takes "
                f"{size[1]}x{size[0]} input, and any other size would change its vectors; "
                "remove image_size or set it to the model's input size"
            )

    # -- engine, built lazily --------------------------------------------------------------

    @property
    def encoder(self) -> Encoder:
        return self._ensure()[0]

    @property
    def dimension(self) -> int:
        if self._encoder is None and self.model_facts.dimension is not None:
            return self.model_facts.dimension
        return self.encoder.dimension

    @property
    def pipeline(self) -> ImagePipeline:
        """The image pipeline, whose per-item steps the dynamic batcher schedules."""
        return self._ensure()[1]

    def _ensure(self) -> tuple[Encoder, ImagePipeline]:
        with self._lock:
            if self._encoder is None or self._pipeline is None:
                encoder = create_encoder(self.model_ref, self.settings)
                self._check_dimension(encoder.dimension)
                self._check_image_size(encoder.preprocessor.size)
                if self.settings.cache_embeddings:
                    namespace = ImagePipeline.cache_namespace(encoder, self.settings.exact)
                    self._cache = EmbeddingCache(self.settings.embedding_cache_dir, namespace)
                self._pipeline = ImagePipeline(encoder, self.settings, self._cache, self.intake)
                self._encoder = encoder
            return self._encoder, self._pipeline

    # -- sync API ----------------------------------------------------------------------------

    def embed_images(
        self, sources: Sequence[Input], progress: ProgressCallback | None = None
    ) -> list[ImageEmbeddingResult]:
        """One result per source, in order: an embedding or a typed error, never an exception."""
        return list(self.iter_images(sources, progress))

    def iter_images(
        self,
        sources: Sequence[Input],
        progress: ProgressCallback | None = None,
        *,
        known: Sequence[str | None] | None = None,
    ) -> Iterator[ImageEmbeddingResult]:
        """Like `embed_images`, streamed batch by batch (for long runs). `known`: per source,
        the image id (content hash) already stored for it; a source still that image is not
        embedded again (its result has no embedding, and counts as skipped in progress)."""
        return self._ensure()[1].iter_results(checked_sources(sources), progress, known)

    def embed_image(self, source: Input) -> np.ndarray:
        """The embedding of one image; raises its typed error if it cannot be embedded."""
        return self._embed_one(source).embedding  # type: ignore[return-value]

    def _embed_one(self, source: Input) -> ImageEmbeddingResult:
        (result,) = self.embed_images([source])
        if result.error is not None:
            raise result.error
        return result

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of texts, shape (len(texts), dimension), in the images' space."""
        texts = _text_list(texts, "embed_texts")
        encoder = self.encoder
        if not texts:
            return np.empty((0, encoder.dimension), dtype=np.float32)
        size = self.settings.batch_size
        vectors = np.concatenate(
            [encoder.encode_texts(texts[i : i + size]) for i in range(0, len(texts), size)]
        )
        finite = finite_rows(vectors, len(texts), encoder.dimension)
        if not finite.all():
            bad = ", ".join(f"#{i} {texts[i][:40]!r}" for i in np.flatnonzero(~finite)[:5])
            raise EncodeError(
                f"{encoder.ref} returned a non-finite embedding (NaN or infinity) for text {bad}"
            )
        return similarity.l2_normalize(vectors) if self.settings.normalize else vectors

    def embed_text(self, text: str) -> np.ndarray:
        return self.embed_texts([one_text(text, "embed_text")])[0]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """The tokens of each text that the model reads: its start and end tokens included,
        at most the model's context length (CLIP's 77: a longer text is cut there)."""
        texts = _text_list(texts, "count_tokens")
        return self.encoder.count_tokens(texts) if texts else []

    def similar_images(
        self,
        query_embedding: Sequence[float],
        image_embeddings: Candidates,
        top_k: int = 5,
    ) -> list[SimilarityResult]:
        """The top_k most similar candidates, best first (rank 1). Candidates are a mapping
        (key -> embedding) or a matrix, whose keys are then the row numbers."""
        similarity.checked_top_k(top_k)  # refuses k < 1
        if isinstance(image_embeddings, Mapping):
            keys = list(image_embeddings)
            matrix = [image_embeddings[key] for key in keys]
            for key, row in zip(keys, matrix, strict=True):
                reason = similarity.not_an_embedding(row)
                if reason:  # a dict built from batch_generate_embeddings: name the image
                    raise ConfigurationError(f"the embedding of {key!r} {reason}")
        else:
            matrix = similarity.candidate_rows(image_embeddings)  # a generator as a list
            keys = list(range(len(matrix)))
        scores = similarity.cosine_similarities(query_embedding, matrix)
        return [
            SimilarityResult(
                image_path=keys[i],
                similarity_score=float(scores[i]),
                rank=rank,
                embedding=np.asarray(matrix[i], dtype=np.float32).tolist(),
            )
            for rank, i in enumerate(similarity.top_k(scores, top_k), start=1)
        ]

    # -- stores: index and search ------------------------------------------------------------

    @property
    def provenance(self) -> Provenance:
        """What this service's vectors are: a collection only mixes equal provenance."""
        encoder = self.encoder
        return Provenance(
            model=encoder.ref.name,
            pretrained=encoder.ref.pretrained,
            dimension=encoder.dimension,
            preprocess=ImagePipeline.preprocess_fingerprint(encoder),
        )

    @property
    def store(self) -> VectorStore:
        """The configured vector store (the embedded Postgres by default), opened on first use."""
        if self._parent is not None:
            return self._parent.store
        with self._store_lock:
            if self._store is None:
                self._store = open_store(self.settings)
            return self._store

    def index(
        self,
        items: Sequence[IndexItem | str | os.PathLike[str]] | str | os.PathLike[str],
        collection: str | None = None,
        *,
        prune: bool = False,
        progress: ProgressCallback | None = None,
    ) -> IndexStats:
        """Embed and store items (incremental by content hash; see imgembed.indexing):
        IndexItems and/or sources as the CLI takes them (folders, image files, URLs, .txt/
        .csv/.jsonl lists), read with `read_index_sources`; an item named twice is one."""
        name = collection or self.settings.collection
        return indexing.index(
            self, self.store, name, self._index_items(items), prune=prune, progress=progress
        )

    def _index_items(self, items: Any) -> list[IndexItem]:
        items = [items] if isinstance(items, str | os.PathLike) else items  # one source
        return index_items(items, self.settings.supported_formats)

    def for_collection(self, collection: str | None = None) -> ImageEmbeddingService:
        """A service that embeds as the collection's vectors were made: this one if its model
        made them, else one with the collection's model (see `with_model`)."""
        stored = self.store.provenance(collection or self.settings.collection)
        return self.with_model(stored.model, stored.pretrained)

    def for_indexing(self, collection: str | None = None) -> ImageEmbeddingService:
        """The service that indexes into a collection: an existing one with its own model
        (re-runs need not repeat --model), a new one with this service's. A name the store
        cannot give a new collection is an InvalidRecordError now, not after the images are
        read (or, behind a server, in a background job after the request was accepted)."""
        try:
            return self.for_collection(collection)
        except CollectionNotFoundError:
            self.store.checked_name(collection or self.settings.collection)
            return self

    def create_collection(
        self,
        name: str,
        model: str | None = None,
        pretrained: str | None = None,
        roots: list[Path] | None = None,
        models: list[str] | None = None,
    ) -> tuple[CollectionInfo, bool]:
        """The collection `name` for `model` (as `with_model` reads it and with its checks;
        None: this service's), created if it does not exist; True if this call created it.
        An existing collection named without a model, or with its own, is returned without
        loading that model; one built with another is a ProvenanceMismatchError."""
        try:
            existing = self.store.get_collection(name)
        except CollectionNotFoundError:
            existing = None
        if existing is not None:
            own = existing.provenance
            if model is None:
                return existing, False
            ref = self.named_model(model, pretrained)
            if (ref.name, ref.pretrained) == (own.model, own.pretrained):
                return existing, False
        service = self if model is None else self.with_model(model, pretrained, roots, models)
        return self.store.create_collection(name, service.provenance), existing is None

    def with_model(
        self,
        model: str,
        pretrained: str | None = None,
        roots: list[Path] | None = None,
        models: list[str] | None = None,
    ) -> ImageEmbeddingService:
        """This service if it has that model, else one with that model and otherwise the
        same settings and store (kept, so asking again costs nothing); the model as
        `named_model` reads it. `roots`: where a checkpoint file or `local-dir:` that a
        caller names may lie (a server's allowed roots: a client loads no file from
        elsewhere); None: anywhere. `models`: the other model names a caller may choose (a
        server's allowed models); None: any."""
        ref = self.named_model(model, pretrained)
        if ref == self.model_ref:
            return self
        offered = [self.model_ref.name, *(models or ())]  # its own name with any tag too
        if models is not None and ref.name.casefold() not in _read_as(offered):
            raise SourceNotAllowedError(
                f"this server offers only {', '.join(offered)} (IMGEMBED_ALLOWED_MODELS)", ref.name
            )
        if roots is not None:
            _check_model_files(ref, roots)
        key = (ref.name, ref.pretrained)
        with self._lock:
            if key not in self._siblings:
                update = {"model": ref.name, "pretrained": ref.pretrained, "dimension": None}
                sibling = ImageEmbeddingService(self.settings.model_copy(update=update))
                sibling._parent = self  # one store (connection) for both
                self._siblings[key] = sibling
            return self._siblings[key]

    def named_model(self, model: str, pretrained: str | None = None) -> registry.ModelRef:
        """The model a caller names: with its own tag where none is given (efficientnet-lite0:
        imagenet), else this service's."""
        explicit = pretrained is not None
        return registry.resolve(model, pretrained or self.settings.pretrained, explicit)

    def duplicates(
        self, collection: str | None = None, threshold: float | None = None
    ) -> Duplicates:
        """Groups of near-duplicates; the threshold defaults to the collection's model's."""
        name = collection or self.settings.collection
        if threshold is None:
            model = self.store.provenance(name).model
            threshold = registry.facts(model).duplicate_threshold
        return Duplicates(threshold, find_duplicates(self.store, name, threshold))

    def search_vector(
        self,
        vector: Sequence[float] | np.ndarray,
        collection: str | None = None,
        top_k: int = 10,
        filters: Filters = None,
        *,
        include_embeddings: bool = False,
    ) -> list[SimilarityResult]:
        """Items of a collection nearest to a vector; `include_embeddings` adds each hit's
        stored vector (one more read)."""
        top_k = similarity.checked_top_k(top_k)
        name = collection or self.settings.collection
        stored = self.store.provenance(name)
        if stored != self.provenance:
            raise ProvenanceMismatchError(
                f"collection {name!r} was built with {stored.describe()}; this service "
                f"embeds with {self.provenance.describe()}. Search it with "
                f"--model {stored.model} --pretrained {stored.pretrained}"
            )
        hits = self.store.search(name, np.asarray(vector, dtype=np.float32), top_k, filters)
        vectors: dict[str, list[float]] = {}
        if include_embeddings and hits:
            records = self.store.get(name, [h.id for h in hits])
            vectors = {r.id: np.asarray(r.vector, dtype=np.float32).tolist() for r in records}
        return [
            SimilarityResult(
                h.source, _cosine(h.score), rank, vectors.get(h.id), {**h.metadata, "id": h.id}
            )
            for rank, h in enumerate(hits, start=1)
        ]

    def search_text(
        self,
        text: str,
        collection: str | None = None,
        top_k: int = 10,
        filters: Filters = None,
        *,
        include_embeddings: bool = False,
    ) -> list[SimilarityResult]:
        """Images of a collection most similar to a text (needs a CLIP model)."""
        vector = self.embed_text(checked_search_text(text))
        return self.search_vector(
            vector, collection, top_k, filters, include_embeddings=include_embeddings
        )

    def search_image(
        self,
        source: Input,
        collection: str | None = None,
        top_k: int = 10,
        filters: Filters = None,
        *,
        include_embeddings: bool = False,
    ) -> list[SimilarityResult]:
        """Images of a collection most similar to an image (path, bytes, URL, ...)."""
        vector = self.embed_image(source)
        return self.search_vector(
            vector, collection, top_k, filters, include_embeddings=include_embeddings
        )

    def preprocess(self, source: Input) -> Image.Image:
        """The model-sized RGB image the network sees (before normalisation)."""
        decoded = self.intake.read(source).decode(self.intake.limits)
        return self.encoder.preprocessor.resize_and_crop(decoded.image)

    def image_metadata(self, source: Input, extended: bool = False) -> dict[str, Any]:
        """Width, height, format, mode, file size, dpi, frames, transparency, content hash
        and the quality signal; with `extended`, camera, exposure, dates, orientation, GPS."""
        image_input = self.intake.read(source)
        # Embedding limits (format list, minimum size) don't apply: only the safety ones.
        limits = dataclasses.replace(self.intake.limits, min_side=1, formats=None)
        decoded = image_input.decode(limits)
        metadata = image_input.metadata(extended)
        return {**metadata, "quality": self.intake.quality(decoded)}

    def clear_cache(self) -> int:
        """Empty the persistent embedding cache; returns how many entries were removed."""
        if self._cache is None:  # clearing covers every model, so no encoder is needed
            self._cache = EmbeddingCache(self.settings.embedding_cache_dir, "")
        return self._cache.clear()

    def close(self) -> None:
        for sibling in self._siblings.values():
            sibling.close()
        self.intake.close()
        if self._store is not None:
            self._store.close()
        if self._cache is not None:
            self._cache.close()

    def __enter__(self) -> ImageEmbeddingService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cosine(score: float) -> float:
    return min(1.0, max(-1.0, score))  # a store's float rounding, as in similarity


def checked_search_text(text: str) -> str:
    """A search's text: an empty or blank one would rank by a vector that means nothing."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigurationError("the search text is empty: give a text, or search by an image")
    return text


def _text_list(texts: Sequence[str], method: str) -> list[str]:
    """The texts as a list; one string given where a list is asked for is refused (it would
    be embedded character by character, one vector per letter)."""
    if isinstance(texts, str | bytes):
        raise ConfigurationError(
            f"{method} takes a list of strings, not one {type(texts).__name__}: "
            f"{method}([text]) for one text"
        )
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ConfigurationError(f"{method} takes a list of strings")
    return texts


def _read_as(names: list[str]) -> set[str]:
    """Model names as a client's are read (an alias such as clip-vit-base-patch32, or
    ViT-B/32: ViT-B-32), for comparing without case."""
    read = {name.casefold() for name in names}
    for name in names:
        with contextlib.suppress(ImgEmbedError):  # a checkpoint file: as it is written
            read.add(registry.resolve(name, "", explicit=False).name.casefold())
    return read


def _check_model_files(ref: registry.ModelRef, roots: list[Path]) -> None:
    """SourceNotAllowedError for a checkpoint file or model folder outside the roots."""
    named = ref.local_dir or (Path(ref.pretrained) if ref.is_file else None)
    if named is None:
        return
    if not roots:
        raise SourceNotAllowedError(
            "no model files may be named here: name a model and a pretrained tag, or ask the "
            "operator to allow the folder (IMGEMBED_ALLOWED_ROOTS)",
            str(named),
        )
    # resolved as the intake resolves them: a root given through a link or relative to the
    # working folder holds the real paths of its files
    check_allowed(named, [Path(root).resolve() for root in roots])
