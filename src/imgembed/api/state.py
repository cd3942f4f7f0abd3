"""What one running app holds: settings, the service, one batcher per model, index jobs and
metrics. The model loads in the background at startup: /health answers at once, /ready and
the embedding routes say 503 until it is loaded (no first request timing out on a load)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from imgembed.api.board import open_board
from imgembed.api.jobs import Jobs
from imgembed.api.metrics import Metrics
from imgembed.catalog import Catalog
from imgembed.catalog.catalog import store_settings
from imgembed.config import Settings
from imgembed.engine.batcher import Batcher
from imgembed.errors import CollectionNotFoundError, ImgEmbedError, UnavailableError
from imgembed.service import ImageEmbeddingService

log = logging.getLogger("imgembed.api")


LOADING_RETRY_SECONDS = 2.0  # what a 503 asks a client to wait while the model loads
READY_STORE_SECONDS = 5.0  # /ready waits this long for the store, then says 503
STORE_THREADS = 16  # requests waiting on the database at once; more queue behind them
T = TypeVar("T")


class AppState:
    def __init__(self, settings: Settings, service: ImageEmbeddingService):
        self.settings = settings
        self.service = service
        self.metrics = Metrics()
        self.jobs = Jobs(self.metrics, open_board(settings.data_dir))
        self._batchers: dict[int, Batcher] = {}
        self._loading: dict[int, asyncio.Task[Batcher]] = {}
        self._catalogs: dict[tuple[str, str, str], Catalog] = {}
        self._catalog_lock = threading.Lock()
        self._store_threads = ThreadPoolExecutor(STORE_THREADS, "imgembed-store")
        self.metrics.watch(
            # list(): the metrics thread reads while the event loop may add a batcher
            lambda: sum(b.queue_depth for b in list(self._batchers.values())),
            lambda: sum(b.in_flight for b in list(self._batchers.values())),
            self.jobs.count,
        )

    async def in_store(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Blocking work that waits on the database, on threads of its own: a database that
        hangs (down, restarting) holds those, never the threads that read images."""
        call = functools.partial(contextvars.copy_context().run, work, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._store_threads, call)

    async def start(self) -> None:
        self._load(self.service)  # in the background

    def _load(self, service: ImageEmbeddingService) -> asyncio.Task[Batcher]:
        key = id(service)
        if key not in self._loading:
            self._loading[key] = asyncio.create_task(self._build(service))
        return self._loading[key]

    async def _build(self, service: ImageEmbeddingService) -> Batcher:
        try:
            pipeline = await asyncio.to_thread(lambda: service.pipeline)
        except ImgEmbedError as exc:
            log.error("cannot load %s: %s", service.model_ref, exc)
            raise
        batcher = Batcher(pipeline, observer=self.metrics)
        self._batchers[id(service)] = batcher
        log.info("model %s loaded", service.model_ref)
        return batcher

    def batcher(self) -> Batcher:
        """The main model's batcher, or 503 while it loads (the load error if it failed)."""
        return self._ready_batcher(self.service)

    def _ready_batcher(self, service: ImageEmbeddingService) -> Batcher:
        task = self._load(service)
        if not task.done():
            raise UnavailableError(
                f"the model {service.model_ref} is still loading", LOADING_RETRY_SECONDS
            )
        return task.result()  # raises the load error: ModelUnavailableError -> 503

    async def batcher_for(self, service: ImageEmbeddingService) -> Batcher:
        """A batcher for another model (a collection built with it), loaded on first use."""
        if service is self.service:
            return self.batcher()
        return await asyncio.shield(self._load(service))

    def catalog(self, store_id: str | None = None) -> Catalog:
        """The product catalogue over this server's models, or over the models a store was
        embedded with when the settings name none explicitly (each built once). Blocking."""
        key = _models(self.settings)
        with self._catalog_lock:
            if key not in self._catalogs:
                self._catalogs[key] = Catalog(service=self.service)
            main = self._catalogs[key]
        if store_id is None:
            return main
        recorded = main.repository.provenance(store_id)
        settings = store_settings(self.settings, recorded[0] if recorded else None)
        with self._catalog_lock:
            if _models(settings) not in self._catalogs:
                self._catalogs[_models(settings)] = Catalog(settings)
            return self._catalogs[_models(settings)]

    async def readiness(self) -> dict[str, Any]:
        task = self._loading.get(id(self.service))
        if task is None or not task.done():
            model: Any = "loading"
        elif task.exception() is not None:
            model = f"failed: {task.exception()}"
        else:
            model = True
        store: Any = True
        try:
            # the store opens on first use (starts a server, connects): in the thread too
            check = self.in_store(lambda: self.service.store.provenance(self.settings.collection))
            await asyncio.wait_for(check, READY_STORE_SECONDS)
        except CollectionNotFoundError:
            pass  # the store answered
        except ImgEmbedError as exc:
            store = f"failed: {exc}"
        except TimeoutError:  # a probe must answer while the database reconnects
            store = f"not answering within {READY_STORE_SECONDS:g} s"
        return {"model": model, "store": store}

    async def close(self) -> None:
        await asyncio.to_thread(self.jobs.close)
        for task in self._loading.values():
            task.cancel()
        for batcher in self._batchers.values():
            await batcher.close()
        for catalog in self._catalogs.values():
            await asyncio.to_thread(catalog.close)
        await asyncio.to_thread(self.service.close)
        self._store_threads.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()


def _models(settings: Settings) -> tuple[str, str, str]:
    return (settings.model, settings.pretrained, settings.text_model)


async def get_state(request: Request) -> AppState:
    # async: a plain function would take a thread of the pool that plain routes (waiting on
    # a database that hangs) may fill, and hold every request up behind them
    return request.app.state.imgembed


State = Annotated[AppState, Depends(get_state)]
