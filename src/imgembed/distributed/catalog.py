"""`imgembed catalog embed --ray`: the catalogue's bulk job with its images embedded on Ray.

The driver takes the store's lock, checks and records its provenance and plans the run
(Catalog.embed, jobs.EmbedRun.plan); the stages embed the images; writer actors then run
each batch through the job's own `process_batch` (texts in one call, fusion by category,
one transaction per batch), so a product's vectors equal the local run's. The driver
reports batches and products as they are written and ends the run like the local one."""

from __future__ import annotations

import contextlib
import pickle
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import ray

from imgembed.catalog import jobs
from imgembed.catalog.records import StoreProvenance
from imgembed.catalog.repository import ProductRepository
from imgembed.config import Settings
from imgembed.distributed import cluster, stages

TASK = "_imgembed_task"  # a pickled jobs.Task


class _Outcomes(jobs.NoEvents):
    """Collects what process_batch reports, to be sent back to the driver."""

    def __init__(self) -> None:
        self.errors: dict[str, str | None] = {}

    def product(self, product_id: str, error: str | None, text_only: bool = False) -> None:
        self.errors[product_id] = error


class CatalogWriter:
    """Ray actor: the text embedder and a database session; one batch per call."""

    def __init__(self, settings: Settings, store_id: str, provenance: StoreProvenance):
        from imgembed.catalog import Catalog

        self.catalog = Catalog(settings)
        assert settings.database_url is not None  # cluster.postgres_settings set it
        repository = ProductRepository(
            settings.database_url, upgrade=False, reconnect_seconds=settings.db_reconnect_timeout
        )
        self.run = jobs.EmbedRun(
            repository,
            None,  # the images come embedded
            self.catalog.text_embedder,
            self.catalog.weights,
            provenance,
            store_id,
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        tasks = [pickle.loads(blob) for blob in table.column(TASK).to_pylist()]
        results = [pickle.loads(b) for b in table.column(stages.RESULT).to_pylist() if b]
        stats = jobs.EmbedStats(self.run.store_id, "")
        outcomes = _Outcomes()
        self.run.process_batch(tasks, iter(results), stats, outcomes)
        failed = {f["product_id"]: f for f in stats.failures}
        return pa.table(
            {
                "product_id": [task.product_id for task in tasks],
                "error": [outcomes.errors.get(task.product_id) for task in tasks],
                "error_type": [failed.get(t.product_id, {}).get("error_type") for t in tasks],
                "message": [failed.get(t.product_id, {}).get("error") for t in tasks],
                "text_only": [
                    t.product_id not in failed and t.row.image_url is None for t in tasks
                ],
            }
        )


class RayRunner:
    """A jobs.Runner that embeds the images on Ray and writes from Ray actors."""

    def __init__(self, catalog: Any):
        self.catalog = catalog

    def __call__(
        self,
        run: jobs.EmbedRun,
        mode: str,
        batch_size: int,
        product_ids: Sequence[str] | None,
        events: jobs.EmbedEvents | None,
    ) -> jobs.EmbedStats:
        events = events or jobs.NoEvents()
        started = time.perf_counter()
        tasks, stats = run.plan(mode, batch_size, product_ids)
        events.started(stats)
        run.begin(tasks, mode, events)
        if tasks:
            workers = cluster.postgres_settings(self.catalog.settings)
            rows = [
                {
                    "product_id": task.product_id,
                    "source": task.row.image_url if task.embed_image else None,
                    TASK: pickle.dumps(task, protocol=5),
                }
                for task in tasks
            ]
            ds = stages.from_rows(rows, batch_size)
            ds = stages.stages(ds, self.catalog.service, settings=workers, keep_results=True)
            ds = ds.map_batches(
                CatalogWriter,
                batch_size=batch_size,
                batch_format="pyarrow",
                fn_constructor_kwargs={
                    "settings": workers,
                    "store_id": run.store_id,
                    "provenance": run.provenance,
                },
                compute=ray.data.ActorPoolStrategy(size=1),
                num_cpus=0,  # mostly waits on the database (and a small text model)
            )
            with contextlib.closing(stages.outcomes(ds, batch_size)) as batches:
                for number, batch in enumerate(batches, 1):
                    events.batch(number, stats, batch.num_rows)
                    _fold(batch, stats, events)
                    events.batch_done(stats)
        run.finish(stats, started, events)
        return stats


def _fold(batch: pa.Table, stats: jobs.EmbedStats, events: jobs.EmbedEvents) -> None:
    for row in batch.to_pylist():
        stats.processed += 1
        if row["error_type"] is None:
            stats.successful += 1
            stats.text_only += row["text_only"]
        else:
            stats.failed += 1
            stats.failures.append(
                {
                    "product_id": row["product_id"],
                    "error": row["message"],
                    "error_type": row["error_type"],
                }
            )
        events.product(row["product_id"], row["error"], text_only=row["text_only"])


def embed_store(
    catalog: Any,
    store_id: str,
    *,
    batch_size: int = 50,
    mode: str = "changed",
    product_ids: Sequence[str] | None = None,
    events: jobs.EmbedEvents | None = None,
    address: str | None = None,
) -> jobs.EmbedStats:
    """`catalog.embed(...)` with the images embedded and the batches written on Ray."""
    with cluster.connect(address, catalog.settings):
        return catalog.embed(
            store_id,
            batch_size=batch_size,
            mode=mode,
            product_ids=product_ids,
            events=events,
            runner=RayRunner(catalog),
        )
