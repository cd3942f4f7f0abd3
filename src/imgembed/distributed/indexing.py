"""`imgembed index --ray`: the local indexing run's semantics on a Ray cluster.

The driver reads the collection's content hashes and hands each item its stored hash;
the stages (stages.py) skip unchanged items before the encoder; writer actors store each
batch in one atomic upsert (indexing.run.store_batch, the local run's own), so a driver or
worker killed at any moment loses at most the batches in flight, and the next run skips
what was stored: every image is stored exactly once. The driver folds each item's outcome
into the run's IndexStats (failures typed, as locally), reports progress, prunes and
refreshes the planner's statistics like the local run."""

from __future__ import annotations

import contextlib
import json
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import ray

from imgembed.config import Settings
from imgembed.distributed import cluster, stages
from imgembed.engine.pipeline import Progress
from imgembed.indexing import IndexItem, IndexStats
from imgembed.indexing.run import (
    begin,
    finish,
    guarded,
    repeatable,
    storable,
    store_batch,
    unchanged_hash,
)
from imgembed.indexing.sources import unique_items
from imgembed.names import printable
from imgembed.store import Provenance, open_store
from imgembed.store.base import StoredItem, checked_name


class IndexWriter:
    """Ray actor: stores each batch of embedded items in one atomic upsert."""

    def __init__(self, settings: Settings, collection: str, provenance: Provenance):
        self.store = open_store(settings)
        self.store.create_collection(collection, provenance)  # refuses another model's
        self.collection = collection
        self.dimension = provenance.dimension

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.select(["id", "source", "metadata", "status"]).to_pylist()
        results = table.column(stages.RESULT).to_pylist()
        stats = IndexStats()
        records, status = [], []
        for row, blob in zip(rows, results, strict=True):
            result = None if blob is None else pickle.loads(blob)
            if row["status"] == "skipped":
                status.append("skipped")
                continue
            item = IndexItem(row["id"], row["source"], json.loads(row["metadata"]))
            status.append("stored")
            if result.error is not None:
                stats.fail(item.id, item.source, result.error)
                continue
            if record := storable(item, result, self.dimension, stats):
                records.append(record)
        store_batch(self.store, self.collection, records, stats)
        failures = {failure["id"]: failure for failure in stats.failures}
        outcome = [
            "failed" if row["id"] in failures else state
            for row, state in zip(rows, status, strict=True)
        ]
        failure = [
            json.dumps(failures[row["id"]]) if row["id"] in failures else None for row in rows
        ]
        return pa.table(
            {
                "status": pa.array(outcome, pa.string()),
                "cached": table.column("cached"),
                "failure": pa.array(failure, pa.string()),
            }
        )


def index(
    service: Any,
    items: Sequence[IndexItem],
    collection: str | None = None,
    *,
    prune: bool = False,
    progress: Callable[[Progress], None] | None = None,
    address: str | None = None,
) -> IndexStats:
    """Like `service.index(...)`, on Ray (see imgembed.distributed.cluster for `address`)."""
    settings = service.settings
    name = collection or settings.collection
    cluster.check_shared_store(settings)  # before Ray starts: seconds, not a run
    with cluster.connect(address, settings):
        return _index(service, list(items), name, prune, progress)


def _index(
    service: Any,
    items: list[IndexItem],
    name: str,
    prune: bool,
    progress: Callable[[Progress], None] | None,
) -> IndexStats:
    started = time.perf_counter()
    checked_name(name)  # before the run: a name no store takes is not "run again"
    items = unique_items(items)  # as a local run's (indexing.run.index)
    workers = cluster.worker_settings(service.settings)
    stats = IndexStats(total=len(items))
    unusable = [item for item in items if item.error is not None]
    todo = [item for item in items if item.error is None]
    state = Progress(total=len(items))
    seen, waiting = repeatable(progress)
    with guarded(service.store, name, stats, service.settings.cache_embeddings):
        provenance = service.provenance
        store = service.store
        store.create_collection(name, provenance)
        stored = store.stored_items(name)
        begin(store, name, todo, stored)
        for item in unusable:
            stats.processed += 1
            stats.fail(item.id, item.source, item.error)  # type: ignore[arg-type]
        state.done = state.failed = len(unusable)
        if todo:
            ds = stages.from_rows([_row(item, stored) for item in todo], workers.batch_size)
            ds = stages.stages(ds, service, settings=workers, keep_results=True)
            ds = ds.map_batches(
                IndexWriter,
                batch_size=workers.batch_size,
                batch_format="pyarrow",
                fn_constructor_kwargs={
                    "settings": workers,
                    "collection": name,
                    "provenance": provenance,
                },
                compute=ray.data.ActorPoolStrategy(size=1),
                num_cpus=0,  # waits on the database
            )
            with contextlib.closing(stages.outcomes(ds)) as batches:
                for batch in batches:
                    _fold(batch, stats, state)
                    if seen:
                        seen(Progress(**vars(state)))
        finish(store, name, items, stored, prune, stats, waiting)
    stats.duration = time.perf_counter() - started
    return stats


def _row(item: IndexItem, stored: dict[str, StoredItem]) -> dict[str, Any]:
    return {
        "id": printable(item.id),
        "source": printable(item.source),
        "metadata": json.dumps(item.metadata, default=str, ensure_ascii=False),
        stages.STORED_HASH: unchanged_hash(item, stored),
    }


def _fold(batch: pa.Table, stats: IndexStats, state: Progress) -> None:
    for row in batch.to_pylist():
        stats.processed += 1
        state.done += 1
        if row["status"] == "skipped":
            stats.skipped += 1
        elif row["status"] == "failed":
            stats.failed += 1
            stats.failures.append(json.loads(row["failure"]))
            state.failed += 1
        else:
            stats.successful += 1
            state.cached += bool(row["cached"])
            state.embedded += not row["cached"]
