"""Indexing run: embed what is new or changed, store it in atomic batches, skip what is
stored as it is now (same content hash, source and metadata), optionally prune what is gone.

Batches are stored on a thread of their own while the next ones are embedded. A run killed
at any moment (even kill -9) loses at most the batches not yet stored; the next run skips
what was stored (same id, same content hash) and, through the embedding
cache, does not embed twice what was embedded but not stored.

Failures: a source that cannot be used (a list row without an image, a folder that cannot
be listed), an image that cannot be embedded, or a record the store cannot hold (NaN
vector) fails that item alone. The store retries a batch once after a lost connection
(store/pgconn.py); when the store still fails, the run stops with that StoreError, its
message saying what was kept and how to go on."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imgembed.engine.pipeline import Progress
from imgembed.errors import (
    CollectionNotFoundError,
    ImgEmbedError,
    InvalidRecordError,
    ProvenanceMismatchError,
    StoreBusyError,
    StoreError,
)
from imgembed.indexing.sources import IndexItem, unique_items
from imgembed.names import printable
from imgembed.results import ImageEmbeddingResult
from imgembed.store.base import (
    Record,
    StoredItem,
    VectorStore,
    checked_record,
    each_on_refusal,
)

_IMAGE_FIELDS = ("width", "height", "format")
_DERIVED = (*_IMAGE_FIELDS, "confidence")  # stored metadata that comes from the image


@dataclass
class IndexStats:
    total: int = 0
    processed: int = 0
    successful: int = 0  # stored by this run
    failed: int = 0
    skipped: int = 0
    pruned: int = 0
    duration: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)
    prune_skipped: bool = False  # pruning asked for, but some sources could not be read

    @property
    def images_per_second(self) -> float:
        """Images embedded and stored per second (skipped and failed ones are not work done)."""
        return self.successful / self.duration if self.duration > 0 else 0.0

    def fail(self, item_id: str, source: str, error: ImgEmbedError) -> None:
        self.failed += 1
        self.failures.append(
            {"id": printable(item_id), "source": printable(source),
             "error": printable(str(error)), "error_type": type(error).__name__}
        )  # fmt: skip


def index(
    service: Any,
    store: VectorStore,
    collection: str,
    items: list[IndexItem],
    *,
    prune: bool = False,
    progress: Callable[[Progress], None] | None = None,
) -> IndexStats:
    started = time.perf_counter()
    store.checked_name(collection)  # before the run: a name it refuses is not "run again"
    items = unique_items(items)  # items of the library or a request, as a list file's are
    stats = IndexStats(total=len(items))
    with guarded(store, collection, stats, service.settings.cache_embeddings):
        _run(service, store, collection, items, prune, progress, stats)
    stats.duration = time.perf_counter() - started
    return stats


def _run(
    service: Any,
    store: VectorStore,
    collection: str,
    items: list[IndexItem],
    prune: bool,
    progress: Callable[[Progress], None] | None,
    stats: IndexStats,
) -> None:
    unusable = [item for item in items if item.error is not None]
    todo = [item for item in items if item.error is None]
    for item in unusable:
        stats.processed += 1
        stats.fail(item.id, item.source, item.error)  # type: ignore[arg-type]
    existed = _exists(store, collection)
    if not todo and not existed:
        return  # every source unreadable: no new, empty collection to show for it
    provenance = service.provenance
    store.create_collection(collection, provenance)
    stored = store.stored_items(collection)
    begin(store, collection, todo, stored)
    batch: list[Record] = []
    known = [unchanged_hash(item, stored) for item in todo]
    seen, waiting = repeatable(_shifted(progress, len(unusable)))
    results = service.iter_images(
        [item.source for item in todo], seen, known=known
    )  # an image still of its known hash is not embedded again
    with Writer(store, collection, stats) as writer:
        for item, stored_hash, result in zip(todo, known, results, strict=True):
            stats.processed += 1
            if result.error is not None:
                stats.fail(item.id, item.source, result.error)
            elif stored_hash == result.image_id:
                stats.skipped += 1
            elif record := storable(item, result, provenance.dimension, stats):
                batch.append(record)
                if len(batch) >= service.settings.batch_size:
                    writer.put(batch)
                    batch = []
        writer.put(batch)
    if not existed and not stats.successful:  # every image failed: no empty collection either
        store.drop_collection(collection)
        return
    finish(store, collection, items, stored, prune, stats, waiting)


def _exists(store: VectorStore, collection: str) -> bool:
    try:
        store.provenance(collection)
    except CollectionNotFoundError:
        return False
    return True


@contextlib.contextmanager
def guarded(store: VectorStore, collection: str, stats: IndexStats, cached: bool) -> Iterator[None]:
    """A run holding the collection (one run per collection at a time: StoreBusyError for
    the second), its store errors saying what was kept and how to go on (`cached`: the
    embedding cache is on)."""
    try:
        with store.writing(collection):
            yield
    except (ProvenanceMismatchError, InvalidRecordError):
        raise  # the collection itself (its model, a name this store cannot hold): not "go on"
    except StoreBusyError as exc:
        if exc.__cause__ is None:  # the collection's lock refused: its message says it all
            raise
        raise interrupted(exc, stats, cached) from exc  # a conflict the database broke
    except CollectionNotFoundError as exc:  # dropped by someone else during the run
        raise CollectionNotFoundError(
            f"{exc}\nIndexing stopped after {stats.processed} of {stats.total} items. To make "
            "the collection again, index the sources again (the same `imgembed index` command)."
        ) from exc
    except StoreError as exc:
        raise interrupted(exc, stats, cached) from exc


def unchanged_hash(item: IndexItem, stored: Mapping[str, StoredItem]) -> str | None:
    """The content hash stored for the item when its source and metadata are stored as they
    are now: an image that still has it needs no new record. A changed price or category in
    a list is stored again (the embedding cache spares the model)."""
    entry = stored.get(printable(item.id))
    if entry is None or entry.source != printable(item.source):
        return None
    own = json.loads(json.dumps(item.metadata, default=str))  # as the store gives it back
    derived = {k: v for k, v in entry.metadata.items() if k in _DERIVED and k not in own}
    return entry.content_hash if {**derived, **own} == entry.metadata else None


def begin(
    store: VectorStore, collection: str, todo: Sequence[IndexItem], stored: Mapping[str, Any]
) -> bool:
    """Before a run's first batch: tell the store how many new items come (a bulk load into
    a new or much-grown collection builds its index afterwards)."""
    return store.bulk_load(collection, sum(printable(item.id) not in stored for item in todo))


def finish(
    store: VectorStore,
    collection: str,
    items: Sequence[IndexItem],
    stored: Mapping[str, Any],
    prune: bool,
    stats: IndexStats,
    waiting: Callable[[str], None] | None = None,
) -> None:
    """After a run's last batch: prune what is gone (not when some source could not be read:
    what it held might still exist; a row that names its id but no usable image keeps that
    item and blocks nothing), build an index a bulk load set aside (also one a stopped run
    left unbuilt; `waiting` as `VectorStore.refresh` takes it) and refresh the planner's
    statistics."""
    if prune and any(item.unknown for item in items):
        stats.prune_skipped = True
    elif prune:
        gone = set(stored) - {printable(item.id) for item in items}
        stats.pruned = store.delete(collection, gone) if gone else 0
    store.refresh(collection, bool(stats.successful or stats.pruned), waiting)


class Writer:
    """Stores batches on a thread of its own, so that the model embeds the next batch
    while the database stores this one. At most two batches wait (memory stays bounded).
    Leaving the `with` block stores what waits; an error stops the writer (what waits then is
    not stored) and is raised by the next `put` or on leaving, after the counts are in
    `stats`."""

    def __init__(self, store: VectorStore, collection: str, stats: IndexStats):
        self._store, self._collection, self._stats = store, collection, stats
        self._own = IndexStats()  # this thread's counts, added to `stats` on leaving
        self._queue: queue.Queue[list[Record] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="imgembed-writer", daemon=True)
        self._thread.start()

    def put(self, batch: list[Record]) -> None:
        if self._error is not None:
            raise self._error
        if batch:
            self._queue.put(batch)

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is None:  # after an error: only drain, so `put` never blocks
                try:
                    store_batch(self._store, self._collection, batch, self._own)
                except BaseException as exc:  # raised again in the run's thread
                    self._error = exc

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._queue.put(None)
        self._thread.join()
        self._stats.successful += self._own.successful
        self._stats.failed += self._own.failed
        self._stats.failures.extend(self._own.failures)
        if self._error is not None:
            raise self._error


def store_batch(
    store: VectorStore, collection: str, batch: list[Record], stats: IndexStats
) -> None:
    """One atomic upsert; a record the database refuses fails alone, the rest is stored."""

    def write(records: list[Record]) -> None:
        store.upsert(collection, records)
        stats.successful += len(records)

    each_on_refusal(write, batch, lambda record, exc: stats.fail(record.id, record.source, exc))


def interrupted(exc: StoreError, stats: IndexStats, cached: bool) -> StoreError:
    """The store error that stopped a run, saying what was kept and how to go on (`cached`:
    the embedding cache is on)."""
    cache = (
        ", and the embedding cache spares embedding again what was embedded but not stored"
        if cached
        else ""
    )
    return type(exc)(
        f"{exc}\nIndexing stopped after {stats.processed} of {stats.total} items. The "
        f"{stats.successful} items this run stored are kept, as is everything stored before. "
        "To continue, index the same sources again (the same `imgembed index` command): "
        f"stored items are skipped by content hash{cache}."
    )


def _shifted(
    progress: Callable[[Progress], None] | None, already: int
) -> Callable[[Progress], None] | None:
    """Progress over all items when `already` of them failed before embedding."""
    if progress is None or not already:
        return progress
    return lambda p: progress(
        dataclasses.replace(
            p, total=p.total + already, done=p.done + already, failed=p.failed + already
        )
    )


def repeatable(
    progress: Callable[[Progress], None] | None,
) -> tuple[Callable[[Progress], None] | None, Callable[[str], None] | None]:
    """`progress`, and a `waiting` hook that reports its last state again, saying what the
    store is at, while it builds (a job's callback raises there when the job is stopped)."""
    if progress is None:
        return None, None
    last: list[Progress] = []

    def seen(state: Progress) -> None:
        last[:] = [state]
        progress(state)

    def again(what: str) -> None:
        if last:
            progress(dataclasses.replace(last[0], waiting=what))

    return seen, again


def storable(
    item: IndexItem, result: ImageEmbeddingResult, dimension: int, stats: IndexStats
) -> Record | None:
    """The record of an embedded item, or None when the store could not hold it (e.g. a NaN
    vector): then it fails alone."""
    record = record_for(item, result)
    try:
        checked_record(record, dimension)
    except InvalidRecordError as exc:
        stats.fail(item.id, item.source, exc)
        return None
    return record


def record_for(item: IndexItem, result: ImageEmbeddingResult) -> Record:
    """What the store keeps of an embedded item: its vector, hash, source and metadata."""
    image = {key: result.metadata.get(key) for key in _IMAGE_FIELDS}
    metadata = {**image, "confidence": result.confidence, **item.metadata}
    assert result.embedding is not None and result.image_id is not None
    return Record(
        printable(item.id), result.embedding, result.image_id, printable(item.source), metadata
    )
