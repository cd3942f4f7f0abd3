"""The bulk embed of a store: which products need work, and doing it in atomic batches.

A product is processed when it has no vectors yet, failed before, its text changed (the
hash of its product text), its image URL changed, or its category's weights changed (then
only re-fused from its stored vectors: no model runs). `missing` mode takes only the first
two; `force` takes every product. An unchanged image URL is not downloaded again (its
content is taken as unchanged: `force` fetches every image anew).

Images of the whole run stream through one `iter_images` (downloads and decoding run ahead
of the encoder and of the writes); each batch's texts go to the text embedder in one call;
each batch is written in one transaction. A run killed at any moment (even kill -9) loses at
most the batch in flight: the next run skips what was written. A product whose image cannot
be had is recorded as failed with its error (and its earlier vectors, if any, are kept); it is
retried on the next run. A failing text embedder (an API down after its retries, a rejected
key) stops the run with its typed error: what was written stays."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from imgembed.catalog.fusion import fuse, unit
from imgembed.catalog.products import product_text, text_hash
from imgembed.catalog.records import EmbeddedProduct, FailedProduct, PlanRow, StoreProvenance
from imgembed.catalog.repository import ProductRepository
from imgembed.catalog.text_vectors import TextEmbedder, UnusableRowsError
from imgembed.catalog.weights import Weights, WeightsTable
from imgembed.results import ImageEmbeddingResult

log = logging.getLogger(__name__)
MODES = ("changed", "missing", "force")


@dataclass(frozen=True)
class Task:
    row: PlanRow
    text: str
    text_hash: str
    category: str  # the weights table's category
    weights: Weights
    embed_text: bool
    embed_image: bool

    @property
    def product_id(self) -> str:
        return self.row.product_id


def plan(rows: Sequence[PlanRow], table: WeightsTable, mode: str) -> list[Task]:
    """The products this run must process, in order."""
    tasks = []
    for row in rows:
        text = product_text(row.title, row.description, row.category, row.price, row.currency)
        digest = text_hash(text)
        category, weights = table.weights(row.category)
        retry = row.status == "failed"
        missing = retry or not row.has_combined
        if mode == "missing" and not missing:
            continue
        # pending with vectors: a forced run that stopped before it came to this product
        redo = mode == "force" or retry or row.status == "pending"
        embed_text = redo or not row.has_text or row.text_hash != digest
        embed_image = row.image_url is not None and (
            redo or not row.has_image or row.embedded_image_url != row.image_url
        )
        image_gone = row.image_url is None and row.has_image
        reweigh = row.weight_category != category or not _same(
            (row.image_weight, row.text_weight), (weights.image, weights.text)
        )
        if missing or embed_text or embed_image or image_gone or reweigh:
            tasks.append(Task(row, text, digest, category, weights, embed_text, embed_image))
    return tasks


def _same(stored: tuple[float | None, float | None], wanted: tuple[float, float]) -> bool:
    return all(s is not None and abs(s - w) < 1e-9 for s, w in zip(stored, wanted, strict=True))


@dataclass
class EmbedStats:
    store_id: str
    mode: str
    total: int = 0  # products in the store (or among the ids asked for)
    to_process: int = 0
    processed: int = 0
    successful: int = 0
    failed: int = 0
    skipped: int = 0  # up to date
    text_only: int = 0  # embedded without an image (none given)
    batches: int = 0
    duration: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def products_per_second(self) -> float:
        return self.processed / self.duration if self.duration > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "products_per_second": round(self.products_per_second, 3)}


class EmbedEvents(Protocol):
    """What a surface may show while a run goes (all called on the running thread)."""

    def started(self, stats: EmbedStats) -> None: ...

    def batch(self, number: int, stats: EmbedStats, size: int) -> None: ...

    def product(self, product_id: str, error: str | None, text_only: bool = False) -> None:
        """Each product of a batch once stored: its error, or None; `text_only`: stored with
        no image (it has none)."""

    def batch_done(self, stats: EmbedStats) -> None: ...

    def waiting(self, what: str) -> None:
        """Optional. Called every half second while the run waits on the database (its
        index build, or another session's turn at the stores' indexes); may raise to stop
        the run."""


class NoEvents:
    def started(self, stats: EmbedStats) -> None:
        pass

    def batch(self, number: int, stats: EmbedStats, size: int) -> None:
        pass

    def product(self, product_id: str, error: str | None, text_only: bool = False) -> None:
        pass

    def batch_done(self, stats: EmbedStats) -> None:
        pass

    def waiting(self, what: str) -> None:
        pass


def _waiting(events: EmbedEvents) -> Callable[[str], None] | None:
    # optional: events classes written before it (not derived from NoEvents) have none
    return getattr(events, "waiting", None)


class Runner(Protocol):
    """Runs a planned job: `EmbedRun.run` here, or imgembed.distributed's on a Ray cluster."""

    def __call__(
        self,
        run: EmbedRun,
        mode: str,
        batch_size: int,
        product_ids: Sequence[str] | None,
        events: EmbedEvents | None,
    ) -> EmbedStats: ...


@dataclass
class EmbedRun:
    repository: ProductRepository
    service: Any  # ImageEmbeddingService
    text_embedder: TextEmbedder
    table: WeightsTable
    provenance: StoreProvenance
    store_id: str

    def run(
        self,
        mode: str,
        batch_size: int,
        product_ids: Sequence[str] | None = None,
        events: EmbedEvents | None = None,
    ) -> EmbedStats:
        events = events or NoEvents()
        started = time.perf_counter()
        tasks, stats = self.plan(mode, batch_size, product_ids)
        events.started(stats)
        self.begin(tasks, mode, events)
        batches = [tasks[i : i + batch_size] for i in range(0, len(tasks), batch_size)]
        sources = [task.row.image_url for task in tasks if task.embed_image]
        images = self.service.iter_images(sources) if sources else iter(())
        try:
            for number, batch in enumerate(batches, 1):
                events.batch(number, stats, len(batch))
                self.process_batch(batch, images, stats, events)
                events.batch_done(stats)
        finally:
            if hasattr(images, "close"):
                images.close()  # stops the downloads still running ahead
        self.finish(stats, started, events)
        return stats

    def plan(
        self, mode: str, batch_size: int, product_ids: Sequence[str] | None = None
    ) -> tuple[list[Task], EmbedStats]:
        """The products to process, in order, and the run's statistics so far."""
        rows = self.repository.plan_rows(self.store_id, product_ids)
        tasks = plan(rows, self.table, mode)
        stats = EmbedStats(
            self.store_id,
            mode,
            total=len(rows),
            to_process=len(tasks),
            skipped=len(rows) - len(tasks),
            batches=-(-len(tasks) // batch_size),
        )
        return tasks, stats

    def begin(self, tasks: Sequence[Task], mode: str, events: EmbedEvents) -> None:
        """Before the first batch: a bulk load sets the store's indexes aside (`finish`, or
        the next run's, builds them again); a forced run marks its products to be redone,
        so that a stopped one goes on without --force (each keeps its vectors meanwhile)."""
        if mode == "force":  # first: a job stopped while bulk_load waits resumes "changed"
            self.repository.mark_to_redo(self.store_id, [task.product_id for task in tasks])
        minimum = self.service.settings.defer_index_min
        self.repository.bulk_load(self.store_id, len(tasks), minimum, _waiting(events))

    def finish(self, stats: EmbedStats, started: float, events: EmbedEvents) -> None:
        """After the last batch: the indexes (if set aside) and the planner's statistics,
        the weights table used, the duration."""
        changed = stats.successful > 0
        self.repository.refresh(self.store_id, self.provenance, changed, _waiting(events))
        self.repository.set_weights_version(self.store_id, self.table.version)
        stats.duration = time.perf_counter() - started

    def process_batch(
        self,
        batch: list[Task],
        images: Iterator[ImageEmbeddingResult],
        stats: EmbedStats,
        events: EmbedEvents,
    ) -> None:
        """One batch: its images from `images` (in task order, for the tasks that embed an
        image), its texts in one call, fusion, and one transaction for every outcome."""
        results = {}
        for task in batch:
            if task.embed_image:
                log.debug("[IMAGE] Generating image embedding for: %s", task.row.image_url)
                results[task.product_id] = next(images)
        text_tasks = [task for task in batch if task.embed_text]
        unusable: dict[str, str] = {}
        try:
            vectors = self.text_embedder.embed([task.text for task in text_tasks])
        except UnusableRowsError as exc:  # an odd text fails its product, not the run
            vectors = exc.vectors
            unusable = {text_tasks[i].product_id: exc.row_error() for i in exc.bad}
        texts = dict(zip((task.product_id for task in text_tasks), vectors, strict=True))
        if text_tasks:
            log.debug(
                "[TEXT] Generated %d text embeddings (length: %d)",
                len(text_tasks),
                vectors.shape[1],
            )
        reuse = [t.product_id for t in batch if not (t.embed_text and t.embed_image)]
        stored = self.repository.stored_vectors(self.store_id, reuse)
        embedded: list[EmbeddedProduct] = []
        failed: list[FailedProduct] = []
        for task in batch:
            if task.product_id in unusable:
                outcome: EmbeddedProduct | FailedProduct = FailedProduct(
                    task.product_id, unusable[task.product_id], "TextEmbeddingError"
                )
            else:
                outcome = self._product(task, results.get(task.product_id), texts, stored)
            (failed if isinstance(outcome, FailedProduct) else embedded).append(outcome)
        self.repository.save_batch(
            self.store_id, self.provenance, self.table.version, embedded, failed
        )
        for item in embedded:
            stats.successful += 1
            stats.text_only += item.image is None
            events.product(item.product_id, None, text_only=item.image is None)
        for item in failed:
            stats.failed += 1
            stats.failures.append(
                {"product_id": item.product_id, "error": item.error, "error_type": item.error_type}
            )
            events.product(item.product_id, f"{item.error} ({item.error_type})")
        stats.processed += len(batch)

    def _product(
        self,
        task: Task,
        result: ImageEmbeddingResult | None,
        texts: dict[str, Any],
        stored: dict[str, Any],
    ) -> EmbeddedProduct | FailedProduct:
        previous = stored.get(task.product_id)
        if result is not None:
            if result.error is not None:
                return FailedProduct(
                    task.product_id, str(result.error), type(result.error).__name__
                )
            # unit length, as its part of the fused vector: an image search ranks by cosine
            # also when the service does not normalise (IMGEMBED_NORMALIZE=false)
            image, image_hash = unit(result.embedding, "image embedding"), result.image_id
        elif task.row.image_url is None or previous is None:
            image, image_hash = None, None
        else:
            image, image_hash = previous.image, previous.image_hash
        text = texts[task.product_id] if task.embed_text else previous and previous.text
        if text is None or (task.row.image_url is not None and image is None):
            # another process changed the row since it was planned: the next run redoes it
            return FailedProduct(
                task.product_id, "stored vectors changed during the run", "StoreError"
            )
        combined = fuse(
            image,
            text,
            task.weights,
            self.provenance.image_dimension,
            self.provenance.text_dimension,
        )
        log.debug(
            "[COMBINED] Product %s: %s weights %.2f/%.2f (length: %d)",
            task.product_id,
            task.category,
            task.weights.image,
            task.weights.text,
            combined.shape[0],
        )
        return EmbeddedProduct(
            product_id=task.product_id,
            text=text,
            image=image,
            combined=combined,
            weight_category=task.category,
            image_weight=task.weights.image,
            text_weight=task.weights.text,
            text_hash=task.text_hash,
            image_hash=image_hash,
            image_url=task.row.image_url,
        )
