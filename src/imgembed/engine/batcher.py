"""Dynamic batching: concurrent requests merged into encoder batches (usable without HTTP).

An image is read, hashed, looked up in the cache, decoded and preprocessed in a worker pool
(ImagePipeline's own steps); its pixels then wait in a queue. One encoder task per kind
(images, texts) takes what is waiting: up to `max_batch` items, after waiting at most
`max_wait` seconds for company while other images are still being prepared, and encodes
them in the encoder thread. While the encoder works, new inputs queue up: the busier the
service, the larger its batches. The event loop only
moves items between queues; it never decodes or runs the model.

Failures stay with the requests they belong to:
- an input that cannot be read fails alone, with its typed error;
- a batch the encoder rejects is halved and retried until the bad item is alone, so a
  poisoned input fails only its own request;
- if an encoder task dies, every request waiting on it fails at once with EncodeError (no
  hang, unlike infinity #609) and the next request starts a new task;
- at most `max_queue` inputs are admitted at a time; beyond that, OverloadedError (the HTTP
  layer answers 503 with Retry-After) instead of unbounded memory; a request larger than
  `max_queue` on its own is RequestTooLargeError (413), as no retry would admit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from imgembed.engine.pipeline import ImagePipeline
from imgembed.engine.similarity import l2_normalize
from imgembed.errors import (
    EncodeError,
    ImageError,
    ImgEmbedError,
    OverloadedError,
    RequestTooLargeError,
    UnavailableError,
)
from imgembed.intake.image_input import Input
from imgembed.intake.sources import describe
from imgembed.results import ImageEmbeddingResult

log = logging.getLogger(__name__)

T = TypeVar("T")


class BatchObserver(Protocol):
    """What the batcher reports (the HTTP layer turns it into Prometheus metrics)."""

    def batch(self, kind: str, size: int, seconds: float) -> None: ...

    def outcome(self, outcome: str) -> None:
        """Per image: "embedded", "cached" or "failed"."""
        ...


@dataclass
class _Entry(Generic[T]):
    payload: T
    future: asyncio.Future[Any]


class _Lane(Generic[T]):
    """One queue and the task that encodes what waits in it."""

    def __init__(
        self,
        kind: str,
        encode: Callable[[list[T]], list[Any]],
        batcher: Batcher,
        expecting: Callable[[], bool],
    ):
        self.kind = kind
        self._encode = encode  # runs in the encoder thread; one outcome per payload
        self._batcher = batcher
        self._expecting = expecting  # are more inputs on their way (being prepared)?
        self._queue: asyncio.Queue[_Entry[T]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._inflight: list[_Entry[T]] = []
        self._changed = asyncio.Event()  # an input arrived or stopped being expected

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, payload: T) -> Any:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"imgembed-{self.kind}-encoder")
            self._task.add_done_callback(self._stopped)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Entry(payload, future))
        self.changed()
        return await future

    def changed(self) -> None:
        self._changed.set()

    async def _gather(self) -> None:
        """After the first input: wait for company, at most `max_wait`, and only while more
        inputs are being prepared (a lone request is encoded at once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._batcher.max_wait
        while self._queue.qsize() < self._batcher.max_batch - 1 and self._expecting():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        batcher = self._batcher
        while True:
            batch = [await self._queue.get()]
            await self._gather()
            while len(batch) < batcher.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [entry for entry in batch if not entry.future.done()]  # gone clients
            if not batch:
                continue
            self._inflight = batch
            started = time.perf_counter()
            outcomes = await loop.run_in_executor(
                batcher.encoder_pool, self._encode, [entry.payload for entry in batch]
            )
            if batcher.observer is not None:
                batcher.observer.batch(self.kind, len(batch), time.perf_counter() - started)
            for entry, outcome in zip(batch, outcomes, strict=True):
                if entry.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    entry.future.set_exception(outcome)
                else:
                    entry.future.set_result(outcome)
            self._inflight = []

    def _stopped(self, task: asyncio.Task[None]) -> None:
        """The task ended (it only ends by dying or being cancelled): fail every waiter now."""
        reason = "stopped" if task.cancelled() else f"died: {task.exception()!r}"
        if not task.cancelled():
            log.error("the %s encoder task %s", self.kind, reason)
        error = EncodeError(
            f"the {self.kind} encoder worker {reason}; this input was not encoded (the next "
            "request starts a new worker)"
        )
        waiting = [*self._inflight]
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        self._inflight = []
        for entry in waiting:
            if not entry.future.done():
                entry.future.set_exception(error)

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class Batcher:
    """Merges concurrent embedding requests into encoder batches. Create and use it on one
    event loop; `close()` it when done."""

    def __init__(
        self,
        pipeline: ImagePipeline,
        *,
        max_batch: int | None = None,
        max_wait: float | None = None,
        max_queue: int | None = None,
        observer: BatchObserver | None = None,
    ):
        settings = pipeline.settings
        self.pipeline = pipeline
        self.max_batch = max_batch or settings.batch_size
        self.max_wait = settings.batch_wait_ms / 1000 if max_wait is None else max_wait
        self.max_queue = max_queue or settings.queue_size
        self.observer = observer
        self.normalize = settings.normalize
        # Reading waits on disks and URLs; decoding is capped at one per core by the pipeline.
        self.prepare_pool = ThreadPoolExecutor(
            settings.workers + settings.max_concurrent_fetches, "imgembed-prepare"
        )
        # One encoder thread: each forward pass already uses every core.
        self.encoder_pool = ThreadPoolExecutor(1, "imgembed-encode")
        self._images: _Lane[Any] = _Lane(
            "image", self._encode_images, self, lambda: self._preparing > 0
        )
        # Texts need no preparation: they batch up while the encoder is busy.
        self._texts: _Lane[str] = _Lane("text", self._encode_texts, self, lambda: False)
        self._admitted = 0
        self._preparing = 0  # images being read, decoded and preprocessed
        self._closed = False

    # -- admission ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Inputs admitted and not yet answered (reading, waiting or encoding)."""
        return self._admitted

    @property
    def queue_depth(self) -> int:
        """Inputs prepared and waiting for the encoder."""
        return self._images.depth + self._texts.depth

    def _admit(self, count: int) -> None:
        if self._closed:
            raise UnavailableError("the service is shutting down")
        if count > self.max_queue:  # would never fit: retrying cannot help
            raise RequestTooLargeError(
                f"{count} inputs at once, more than the {self.max_queue} this service holds in "
                "progress (IMGEMBED_QUEUE_SIZE); send them in smaller requests"
            )
        if self._admitted + count > self.max_queue:
            raise OverloadedError(
                f"{self._admitted} inputs are in progress and {count} more would exceed the "
                f"queue limit of {self.max_queue} (IMGEMBED_QUEUE_SIZE); retry shortly"
            )
        self._admitted += count

    # -- images ------------------------------------------------------------------------------

    async def embed_images(
        self,
        sources: Sequence[Input],
        *,
        labels: Sequence[str | None] | None = None,
        extended: bool = False,
        normalize: bool | None = None,
    ) -> list[ImageEmbeddingResult]:
        """One result per source, in order: an embedding or its typed error. `labels` name
        the inputs in results (e.g. an upload's file name); `extended` adds camera, exposure,
        dates and GPS to the metadata; `normalize` overrides the setting for these results."""
        self._admit(len(sources))
        try:
            names = labels or [None] * len(sources)
            return await asyncio.gather(
                *(
                    self._embed_one(source, label, extended, normalize)
                    for source, label in zip(sources, names, strict=True)
                )
            )
        finally:
            self._admitted -= len(sources)

    async def embed_image(self, source: Input, **options: Any) -> ImageEmbeddingResult:
        (result,) = await self.embed_images([source], **options)
        return result

    async def _embed_one(
        self, source: Input, label: str | None, extended: bool, normalize: bool | None
    ) -> ImageEmbeddingResult:
        started = time.perf_counter()
        label = label or describe(source)
        loop = asyncio.get_running_loop()
        raw = None
        try:
            extra: dict[str, Any] = {}
            if extended:  # read once: the header gives EXIF, the bytes are embedded
                source, extra = await loop.run_in_executor(
                    self.prepare_pool, self._read_extended, source
                )
            self._preparing += 1
            try:
                item = await loop.run_in_executor(self.prepare_pool, self.pipeline.prepare, source)
            finally:
                self._preparing -= 1
                self._images.changed()
            item.label = label
            if isinstance(item.error, ImageError) and item.error.source == describe(source):
                item.error.source = label  # "photo.jpg: cannot decode", not "<110 bytes>: ..."
            if item.pixels is not None:
                await self._images.submit(item)  # the encoder sets its vector or error
            item.metadata.update(extra)
            raw = item.vector
            result = self.pipeline.build_result(item)
        except ImgEmbedError as exc:
            result = self.failed_result(label, exc, time.perf_counter() - started)
        if normalize is not None and normalize != result.normalized and result.ok:
            vector = l2_normalize(result.embedding) if normalize else raw
            result = dataclasses.replace(result, embedding=vector, normalized=normalize)
        if self.observer is not None:
            failed, cached = result.error is not None, result.cached
            self.observer.outcome("failed" if failed else "cached" if cached else "embedded")
        return result

    def _read_extended(self, source: Input) -> tuple[Input, dict[str, Any]]:
        """The source's bytes (or image) and its extended metadata, from one read."""
        image_input = self.pipeline.intake.read(source)
        try:
            extra = image_input.metadata(extended=True)
        except Exception:  # untrusted input; the pipeline then names what is wrong with it
            extra = {}
        data = image_input.data if image_input.data is not None else image_input.image
        assert data is not None
        return data, extra

    def failed_result(
        self, label: str, error: ImgEmbedError, seconds: float = 0.0
    ) -> ImageEmbeddingResult:
        """The result of an input that could not be embedded (also for callers that refuse
        an input before it reaches the batcher)."""
        encoder = self.pipeline.encoder
        return ImageEmbeddingResult(
            image_path=label,
            embedding=None,
            image_id=None,
            model_name=str(encoder.ref),
            dimension=encoder.dimension,
            normalized=self.normalize,
            processing_time=seconds,
            error=error,
        )

    def _encode_images(self, items: list[Any]) -> list[None]:
        """In the encoder thread: vectors (or errors) onto the prepared items. A batch the
        encoder rejects is halved and retried, so that a bad item fails alone."""
        try:
            self.pipeline.encode_prepared(items)
        except Exception as exc:  # a runtime's own exception, not wrapped: the batch failed
            log.exception("image encoder failed on a batch of %d", len(items))
            error = EncodeError(f"{self.pipeline.encoder.ref}: image encoding failed: {exc!r}")
            for item in items:
                item.error = error
        shared = items[0].error
        if (
            len(items) > 1
            and isinstance(shared, EncodeError)
            and all(item.error is shared for item in items)
        ):
            for item in items:
                item.error = None
            half = len(items) // 2
            self._encode_images(items[:half])
            self._encode_images(items[half:])
        return [None] * len(items)

    # -- texts -------------------------------------------------------------------------------

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of texts in the images' space, merged with other requests' texts.
        Raises the typed error of the first text that could not be encoded."""
        encoder = self.pipeline.encoder
        if not texts:
            return np.empty((0, encoder.dimension), dtype=np.float32)
        self._admit(len(texts))
        try:
            vectors = await asyncio.gather(*(self._texts.submit(text) for text in texts))
        finally:
            self._admitted -= len(texts)
        return np.stack(vectors)

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray | ImgEmbedError]:
        """In the encoder thread: one vector or error per text, halving rejected batches."""
        try:
            vectors = self.pipeline.encoder.encode_texts(texts)
        except Exception as exc:
            error = exc
            if not isinstance(exc, ImgEmbedError):  # a runtime's own exception
                log.exception("text encoder failed on a batch of %d", len(texts))
                error = EncodeError(f"{self.pipeline.encoder.ref}: text encoding failed: {exc!r}")
            if len(texts) == 1 or not isinstance(error, EncodeError):
                return [error] * len(texts)  # e.g. an image-only model: every text's answer
            half = len(texts) // 2
            return self._encode_texts(texts[:half]) + self._encode_texts(texts[half:])
        return list(l2_normalize(vectors) if self.normalize else vectors)

    # -- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Refuse new work, stop the encoder tasks (failing whatever still waits) and the
        pools. In-flight requests finish first when the server drains before closing."""
        self._closed = True
        await self._images.stop()
        await self._texts.stop()
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)
        self.encoder_pool.shutdown(wait=False, cancel_futures=True)
