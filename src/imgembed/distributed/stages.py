"""The Ray Data stages: decoding and preprocessing as tasks, the encoder in an actor pool.

    rows with a source column
      -> prepare (tasks, one CPU each): read, hash, cache lookup, decode, preprocess
      -> encode (actor pool: one model load per actor, batches of settings.batch_size)
      -> the rows with embedding, content_hash, status, error, error_type, cached,
         confidence and image_metadata (JSON)

Both stages run the engine's own per-item steps (ImagePipeline.prepare, encode_prepared,
build_result), so a vector made on Ray equals one made locally. Between the stages an item
travels pickled in a private column (its pixels, digest and metadata, or its typed error).
A row whose `stored_hash` equals its content hash is `skipped` before it reaches the
encoder; a row without a source is `skipped` too (nothing to embed). An actor that dies
(killed, out of memory) is restarted by Ray Data and its batches retried (Ray Data's
defaults: max_restarts and max_task_retries unlimited); the writers' upserts by id make a
retried batch store nothing twice."""

from __future__ import annotations

import json
import os
import pickle
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from imgembed.config import Settings, load_settings
from imgembed.distributed import cluster
from imgembed.engine.cache import EmbeddingCache
from imgembed.engine.pipeline import ImagePipeline
from imgembed.errors import ConfigurationError, EncodeError
from imgembed.intake.image_input import Intake
from imgembed.intake.sources import is_url
from imgembed.models.preprocess import Preprocessor
from imgembed.models.registry import ModelRef
from imgembed.names import restore

STORED_HASH = "stored_hash"
PREPARED = "_imgembed_prepared"  # a pickled pipeline item, from prepare to encode
RESULT = "_imgembed_result"  # a pickled ImageEmbeddingResult, for the store writers
OUTPUT = ("embedding", "content_hash", "status", "error", "error_type", "cached",
          "confidence", "image_metadata")  # fmt: skip
PREPARE_CALLS = 100
# Tests: a file; the first encoder actor to find it removes it and has itself killed.
KILL_SWITCH = "_IMGEMBED_RAY_KILL_SWITCH"


@dataclass(frozen=True)
class EncoderFacts:
    """What the prepare tasks need of the encoder without loading it: its transform, its
    dimension (cache entries) and names. They never encode."""

    ref: ModelRef
    dimension: int
    preprocessor: Preprocessor
    fingerprint: str

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        raise EncodeError("the prepare stage does not encode")

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise EncodeError("the prepare stage does not encode")

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        raise EncodeError("the prepare stage does not encode")


def prepare(
    table: pa.Table, *, settings: Settings, facts: EncoderFacts, namespace: str, column: str
) -> pa.Table:
    """Ray task: each row's source read, hashed, looked up in the cache, decoded and
    preprocessed (or its typed error)."""
    cache = (
        EmbeddingCache(settings.embedding_cache_dir, namespace)
        if settings.cache_embeddings
        else None
    )
    intake = Intake(settings)
    pipeline = ImagePipeline(facts, settings, cache, intake)
    sources = [_input(value) for value in table.column(column).to_pylist()]
    stored = _column(table, STORED_HASH)
    urls = any(isinstance(source, str) and is_url(source) for source in sources)
    threads = 1 + (settings.max_concurrent_fetches if urls else 0)  # downloads wait, not work
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="imgembed-prepare") as pool:
            # an item still what is stored is read and hashed, not decoded
            items = list(pool.map(
                lambda s, known: None if s is None else pipeline.prepare(s, known), sources, stored
            ))  # fmt: skip
    finally:
        intake.close()
        if cache is not None:
            cache.close()
    blobs, hashes, status = [], [], []
    for item in items:
        unchanged = item is not None and item.skipped
        blobs.append(None if item is None or unchanged else pickle.dumps(item, protocol=5))
        hashes.append(None if item is None else item.digest)
        status.append("skipped" if item is None or unchanged else None)
    table = _set(table, PREPARED, pa.array(blobs, pa.large_binary()))
    table = _set(table, "content_hash", pa.array(hashes, pa.string()))
    return _set(table, "status", pa.array(status, pa.string()))


class Encode:
    """Ray actor: the model, loaded once; encodes the prepared items of each batch."""

    def __init__(self, settings: Settings, keep_results: bool):
        from imgembed.service import ImageEmbeddingService

        self.service = ImageEmbeddingService(settings)
        self.pipeline = self.service.pipeline  # loads the model
        self.keep_results = keep_results

    def __call__(self, table: pa.Table) -> pa.Table:
        _kill_switch()
        items = [None if b is None else pickle.loads(b) for b in table.column(PREPARED).to_pylist()]
        todo = [item for item in items if item is not None]
        size = self.service.settings.batch_size
        for start in range(0, len(todo), size):
            self.pipeline.encode_prepared(todo[start : start + size])
        results = [None if item is None else self.pipeline.build_result(item) for item in items]
        status = [
            old if result is None else "failed" if result.error else "embedded"
            for old, result in zip(_column(table, "status"), results, strict=True)
        ]
        columns: dict[str, pa.Array] = {
            "embedding": pa.array([r and r.embedding for r in results], pa.list_(pa.float32())),
            "status": pa.array(status, pa.string()),
            "error": pa.array([r and r.error and str(r.error) for r in results], pa.string()),
            "error_type": pa.array(
                [r and r.error and type(r.error).__name__ for r in results], pa.string()
            ),
            "cached": pa.array([r and r.cached for r in results], pa.bool_()),
            "confidence": pa.array([r and r.confidence for r in results], pa.float64()),
            "image_metadata": pa.array(
                [r and json.dumps(r.metadata, default=str) for r in results], pa.string()
            ),
        }
        if self.keep_results:
            blobs = [None if r is None else pickle.dumps(r, protocol=5) for r in results]
            columns[RESULT] = pa.array(blobs, pa.large_binary())
        table = table.drop_columns([PREPARED])
        for name, values in columns.items():
            table = _set(table, name, values)
        return table


def embed_dataset(
    ds: ray.data.Dataset,
    settings: Settings | dict[str, Any] | None = None,
    *,
    column: str = "source",
) -> ray.data.Dataset:
    """Map imgembed's decoding and encoder over a Ray Dataset of sources.

    `column` holds a path, URL or data URI per row (text; names that are not UTF-8 written
    `\\xNN`, as imgembed writes them), or the image's bytes (binary, e.g. the `bytes` column
    of `ray.data.read_binary_files`). An optional `stored_hash` column skips rows whose
    content hash equals it. Adds the columns embedding (list of float32, None when failed
    or skipped), content_hash, status (embedded | skipped | failed), error, error_type,
    cached, confidence and image_metadata (JSON); the other columns pass through. The
    model is loaded here once (for its transform) and once in each encoder actor."""
    from imgembed.service import ImageEmbeddingService

    settings = load_settings(settings)
    cluster.configure_data()
    service = ImageEmbeddingService(settings)
    try:
        return stages(ds, service, column=column, keep_results=False)
    finally:
        service.close()


def stages(
    ds: ray.data.Dataset,
    service: Any,
    *,
    column: str = "source",
    keep_results: bool,
    settings: Settings | None = None,
) -> ray.data.Dataset:
    """The two stages over `ds` for `service`'s model; `settings` (the service's by default)
    are what the workers run with. `keep_results` adds the pickled results (RESULT)."""
    settings = settings or service.settings
    encoder = service.encoder
    facts = EncoderFacts(encoder.ref, encoder.dimension, encoder.preprocessor, encoder.fingerprint)
    namespace = ImagePipeline.cache_namespace(encoder, settings.exact)
    gpus = 1 if _wants_gpu(settings) else 0
    actors = encoder_actors(settings, gpus)
    prepared = ds.map_batches(
        prepare,
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        fn_kwargs={
            "settings": settings.model_copy(update={"max_workers": 1}),  # a task has one CPU
            "facts": facts,
            "namespace": namespace,
            "column": column,
        },
        num_cpus=1,
        # A decode worker is replaced after this many batches (returning the memory large
        # decodes fragmented); this also keeps the stage apart from the encoder's, which
        # Ray Data would otherwise fuse into the actors, decoding and encoding in turn.
        max_calls=PREPARE_CALLS,
    )
    return prepared.map_batches(
        Encode,
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={"settings": settings, "keep_results": keep_results},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=settings.ray_actor_cpus,
        num_gpus=gpus,
    )


def encoder_actors(settings: Settings, gpus: int = 0) -> int:
    """How many encoder actors to start: IMGEMBED_RAY_ACTORS, else one per GPU or half the
    CPUs; refused if they would leave no CPU to the decode tasks (Ray would wait for ever)."""
    cpus = cluster.cluster_cpus()
    each = settings.ray_actor_cpus
    actors = settings.ray_actors or (
        cluster.cluster_gpus() if gpus else max(1, int(cpus // 2 // each))
    )
    if actors * each > cpus - 1:
        fit = int((cpus - 1) // each)
        room = (f"at most {fit} actor(s) of {each:g} CPU fit" if fit else
                "lower IMGEMBED_RAY_ACTOR_CPUS or add CPUs")  # fmt: skip
        raise ConfigurationError(
            f"{actors} encoder actor(s) x {each:g} CPU (IMGEMBED_RAY_ACTORS x "
            f"IMGEMBED_RAY_ACTOR_CPUS) would hold {actors * each:g} of the cluster's {cpus} "
            f"CPUs, leaving none to read and decode the images, and the run would wait for "
            f"ever: {room}"
        )
    return actors


def from_rows(rows: list[dict[str, Any]], batch_size: int) -> ray.data.Dataset:
    """A dataset of one block per batch: the stages stream batch by batch (one block of a
    whole run would be decoded by one task and reach the encoder all at once)."""
    return ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))


def outcomes(ds: ray.data.Dataset, batch_size: int | None = None) -> Iterator[pa.Table]:
    """Runs `ds`, yielding its batches on the driver; a worker's typed error is raised as
    itself (a StoreError stays a StoreError). Close it (contextlib.closing) when a run stops
    early (Ctrl-C): else Ray's executor is stopped only when collected, maybe after
    ray.shutdown(), where its cancel started a new local Ray and printed a traceback."""
    try:
        yield from ds.iter_batches(batch_size=batch_size, batch_format="pyarrow")
    except Exception as exc:
        error = cluster.imgembed_error(exc)
        if error is None:
            raise
        raise error from exc


def _wants_gpu(settings: Settings) -> bool:
    if settings.device.startswith("cuda"):
        return True
    return settings.device == "auto" and cluster.cluster_gpus() > 0


def _input(value: Any) -> Any:
    """A source as the intake reads it: bytes as they are, names restored."""
    if value is None or isinstance(value, bytes):
        return value
    return restore(str(value))


def _column(table: pa.Table, name: str) -> list[Any]:
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [None] * table.num_rows


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def _kill_switch() -> None:
    path = os.environ.get(KILL_SWITCH)
    if not path:
        return
    try:
        os.unlink(path)  # only one actor wins
    except FileNotFoundError:
        return
    ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
    time.sleep(30)  # the kill arrives meanwhile
    raise RuntimeError("ray.kill did not stop this actor")
