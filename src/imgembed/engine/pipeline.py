"""The batch pipeline: read + hash + cache lookup + decode + preprocess in worker threads,
encode in batches on the calling thread, results in input order.

Chunk k+1 and k+2 are decoded by the workers while chunk k is encoded, so the two
overlap and memory stays bounded. Each item ends with an embedding or a typed error;
one bad item never fails the others."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from imgembed.config import Settings
from imgembed.engine.cache import EmbeddingCache
from imgembed.engine.similarity import l2_normalize
from imgembed.errors import EncodeError, ImgEmbedError, InvalidImageError
from imgembed.intake.image_input import ImageInput, Input, Intake
from imgembed.intake.sources import describe, is_url
from imgembed.models.runtime import Encoder
from imgembed.results import ImageEmbeddingResult

# Bump when intake or preprocessing changes what a given file embeds to (or its cache entry).
PREPROCESS_VERSION = 2
# Draft-decoded JPEGs keep a short side of at least this many times the model input,
# measured to stay above cosine 0.9999 to a full decode (see tests/unit/test_parity.py).
DRAFT_FACTOR = 2
PREFETCH_CHUNKS = 2


@dataclass
class Progress:
    total: int
    done: int = 0
    embedded: int = 0
    cached: int = 0
    failed: int = 0
    skipped: int = 0  # unchanged since stored (`known`): read and hashed, not embedded
    waiting: str = ""  # what the run waits for after its items (its store's index build)


ProgressCallback = Callable[[Progress], None]


@dataclass
class _Prepared:
    label: str
    started: float
    digest: str | None = None
    pixels: np.ndarray | None = None
    vector: np.ndarray | None = None  # from the cache
    metadata: dict[str, Any] = field(default_factory=dict)
    error: ImgEmbedError | None = None
    cached: bool = False
    skipped: bool = False  # its hash is the one already stored: no vector needed
    seconds: float = 0.0
    log: list[dict[str, str]] | None = None  # debug mode: the steps, timestamped

    def note(self, message: str) -> None:
        if self.log is not None:
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
            self.log.append({"timestamp": stamp, "message": message})


class ImagePipeline:
    def __init__(
        self, encoder: Encoder, settings: Settings, cache: EmbeddingCache | None, intake: Intake
    ):
        self.encoder = encoder
        self.settings = settings
        self.cache = cache
        self.intake = intake
        # Decoding is CPU work: at most one per core, even when more threads wait on URLs.
        self._decode_slots = threading.Semaphore(settings.workers)
        self.draft_min_side = (
            None if settings.exact else DRAFT_FACTOR * encoder.preprocessor.min_side
        )

    @staticmethod
    def preprocess_fingerprint(encoder: Encoder) -> str:
        """Identifies the model's transform and our intake: part of a collection's provenance."""
        preprocess = json.dumps(encoder.preprocessor.as_dict(), sort_keys=True)
        return hashlib.sha256(f"{preprocess}|pp{PREPROCESS_VERSION}".encode()).hexdigest()[:12]

    @staticmethod
    def cache_namespace(encoder: Encoder, exact: bool) -> str:
        preprocess = json.dumps(encoder.preprocessor.as_dict(), sort_keys=True)
        draft = "exact" if exact else f"draft{DRAFT_FACTOR}"
        return f"{encoder.fingerprint}|{preprocess}|pp{PREPROCESS_VERSION}|{draft}"

    def iter_results(
        self,
        sources: Sequence[Input],
        progress: ProgressCallback | None = None,
        known: Sequence[str | None] | None = None,
    ) -> Iterator[ImageEmbeddingResult]:
        """Results in input order, streamed chunk by chunk. `known`: per source, the content
        hash already stored for it; a source whose bytes still hash to it is not decoded or
        encoded (its result has no embedding and no error; a resumed run costs reads only)."""
        state = Progress(total=len(sources))
        size = self.settings.batch_size
        hashes = list(known) if known is not None else [None] * len(sources)
        chunks = [
            list(zip(sources[i : i + size], hashes[i : i + size], strict=True))
            for i in range(0, len(sources), size)
        ]
        threads = self.settings.workers
        if any(is_url(source) for source in sources):  # downloads wait on the network
            threads += self.settings.max_concurrent_fetches
        with ThreadPoolExecutor(threads, thread_name_prefix="imgembed-intake") as pool:
            pending: list[list[Future[_Prepared]]] = []
            for k in range(len(chunks)):
                while len(pending) <= PREFETCH_CHUNKS and k + len(pending) < len(chunks):
                    pending.append(
                        [pool.submit(self._prepare, *pair) for pair in chunks[k + len(pending)]]
                    )
                prepared = [future.result() for future in pending.pop(0)]
                self._encode(prepared)
                for item in prepared:
                    result = self._result(item)
                    state.done += 1
                    state.failed += not result.ok
                    state.skipped += item.skipped
                    state.cached += result.cached
                    state.embedded += result.ok and not (result.cached or item.skipped)
                    yield result
                if progress:
                    progress(dataclasses.replace(state))  # a snapshot the callee may keep

    def _prepare(self, source: Input, known: str | None = None) -> _Prepared:
        item = _Prepared(label=describe(source), started=time.perf_counter())
        if self.settings.debug:
            item.log = []
        try:
            image_input = self.intake.read(source)
            item.digest = image_input.digest
            size = "" if image_input.data is None else f"{len(image_input.data):,} bytes, "
            item.note(f"read {item.label} ({size}sha256 {item.digest[:16]})")
            if item.digest == known:
                item.skipped = True
                item.note("unchanged since it was stored: not embedded again")
            else:
                self._vector_or_pixels(item, image_input)
        except ImgEmbedError as exc:
            item.error = exc
        except Exception as exc:  # untrusted input: whatever a reader throws is this item's
            item.error = InvalidImageError(f"cannot read image: {exc!r}", item.label)
        if item.error is not None:
            item.note(f"failed: {type(item.error).__name__}: {item.error}")
        item.seconds = time.perf_counter() - item.started
        return item

    def _vector_or_pixels(self, item: _Prepared, image_input: ImageInput) -> None:
        """The cached vector, or the decoded and preprocessed pixels for the encoder."""
        hit = None
        if self.cache is not None:  # never raises: a cache problem is not the image's
            hit = self.cache.get(item.digest, self.encoder.dimension)  # type: ignore[arg-type]
            item.note("cache hit: the stored embedding is used" if hit else "cache miss")
        if hit is not None:
            metadata = image_input.metadata(limits=self.intake.limits)
            item.vector, scores = hit
            item.cached = True
            quality = self.intake.flag(scores)  # the threshold may differ from then
            item.metadata = {**metadata, "quality": quality}
            return
        with self._decode_slots:
            decoded = image_input.decode(self.intake.limits, self.draft_min_side)
            item.note(_decoded_note(decoded.metadata, decoded.image.size))
            item.pixels = self.encoder.preprocessor(decoded.image)
            item.note(f"preprocessed to {_preprocess_note(self.encoder.preprocessor)}")
            quality = self.intake.quality(decoded)
        item.metadata = {**decoded.metadata, "quality": quality}

    def _encode(self, prepared: list[_Prepared]) -> None:
        todo = [item for item in prepared if item.pixels is not None]
        if not todo:
            return
        started = time.perf_counter()
        try:
            vectors = self.encoder.encode_images(np.stack([item.pixels for item in todo]))
            finite = finite_rows(vectors, len(todo), self.encoder.dimension)
        except ImgEmbedError as exc:
            for item in todo:
                item.error = exc
                item.note(f"failed: {type(exc).__name__}: {exc}")
            return
        seconds = time.perf_counter() - started
        share = seconds / len(todo)
        for item, vector, ok in zip(todo, vectors, finite, strict=True):
            item.seconds += share
            item.pixels = None
            item.note(
                f"encoded by {self.encoder.fingerprint} in a batch of {len(todo)} "
                f"({seconds * 1000:.1f} ms)"
            )
            if not ok:  # never returned, never cached
                item.error = EncodeError(
                    f"{item.label}: {self.encoder.ref} returned a non-finite embedding "
                    "(NaN or infinity) for this image"
                )
                item.note(f"failed: EncodeError: {item.error}")
                continue
            item.vector = vector
            if self.cache is not None and item.digest:
                self.cache.put(item.digest, vector, item.metadata["quality"])

    def _result(self, item: _Prepared) -> ImageEmbeddingResult:
        vector = item.vector
        if vector is not None and self.settings.normalize:
            vector = l2_normalize(vector)
            item.note("normalised to unit length")
        metadata = item.metadata
        if item.log is not None:
            item.note(f"done in {item.seconds * 1000:.1f} ms")
            metadata = {**metadata, "debug_logs": item.log}
        return ImageEmbeddingResult(
            image_path=item.label,
            embedding=None if item.error else vector,
            image_id=item.digest,
            model_name=str(self.encoder.ref),
            dimension=self.encoder.dimension,
            normalized=self.settings.normalize,
            processing_time=item.seconds,
            metadata=metadata,
            error=item.error,
            cached=item.cached,
            confidence=item.metadata.get("quality", {}).get("confidence"),
        )

    # The per-item steps, public for schedulers that batch across requests
    # (engine/batcher.py): prepare in a worker thread, encode a list of prepared items
    # (each gets its vector, or the batch's error), then build the result.
    prepare = _prepare
    encode_prepared = _encode
    build_result = _result


def _decoded_note(metadata: dict[str, Any], size: tuple[int, int]) -> str:
    original = f"{metadata['width']}x{metadata['height']}"
    shown = f"{size[0]}x{size[1]}"
    scaled = "" if shown == original else f", decoded at {shown}"
    return f"decoded {metadata['format']} {metadata['mode']} {original}{scaled}"


def _preprocess_note(preprocessor: Any) -> str:
    height, width = preprocessor.size
    return f"{width}x{height} ({preprocessor.resize_mode}, {preprocessor.interpolation})"


def finite_rows(vectors: np.ndarray, count: int, dimension: int) -> np.ndarray:
    """Which rows of an encoder's output are usable (all finite); EncodeError if the output
    is not `count` rows of `dimension` values. Every runtime's vectors pass through here
    (images in the pipeline, texts in the service), so none returns NaN or infinity."""
    shape = getattr(vectors, "shape", None)
    if shape != (count, dimension):
        raise EncodeError(f"the model returned shape {shape}, expected ({count}, {dimension})")
    return np.isfinite(vectors).all(axis=1)
