"""Indexing run: embed what is new or changed, store it in atomic batches, skip what is
stored with the same content hash, optionally prune what is gone.

A run killed at any moment (even kill -9) loses at most the batch not yet stored; the
next run skips what was stored (same id, same content hash) and, through the embedding
cache, does not embed twice what was embedded but not stored."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imgembed.engine.pipeline import Progress
from imgembed.indexing.sources import IndexItem
from imgembed.results import ImageEmbeddingResult
from imgembed.store.base import Record, VectorStore

_IMAGE_FIELDS = ("width", "height", "format")


@dataclass
class IndexStats:
    total: int = 0
    processed: int = 0
    successful: int = 0
    failed: int = 0
    skipped: int = 0
    pruned: int = 0
    duration: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.duration if self.duration > 0 else 0.0


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
    store.create_collection(collection, service.provenance)
    stored = store.hashes(collection)
    stats = IndexStats(total=len(items))
    batch: list[Record] = []
    results = service.iter_images([item.source for item in items], progress)
    for item, result in zip(items, results, strict=True):
        stats.processed += 1
        if result.error is not None:
            stats.failed += 1
            stats.failures.append(
                {"id": item.id, "source": item.source, "error": str(result.error),
                 "error_type": type(result.error).__name__}
            )  # fmt: skip
        elif stored.get(item.id) == result.image_id:
            stats.skipped += 1
        else:
            batch.append(_record(item, result))
            stats.successful += 1
            if len(batch) >= service.settings.batch_size:
                store.upsert(collection, batch)
                batch = []
    store.upsert(collection, batch)
    if prune:
        gone = set(stored) - {item.id for item in items}
        stats.pruned = store.delete(collection, gone) if gone else 0
    if stats.successful or stats.pruned:
        store.analyze()
    stats.duration = time.perf_counter() - started
    return stats


def _record(item: IndexItem, result: ImageEmbeddingResult) -> Record:
    image = {key: result.metadata.get(key) for key in _IMAGE_FIELDS}
    metadata = {**image, "confidence": result.confidence, **item.metadata}
    assert result.embedding is not None and result.image_id is not None
    return Record(item.id, result.embedding, result.image_id, item.source, metadata)
