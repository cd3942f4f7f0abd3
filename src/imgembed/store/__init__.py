"""Vector stores: PostgreSQL + pgvector (the embedded default, or any server) and Qdrant."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from imgembed.config import Settings, make_data_dir
from imgembed.errors import ConfigurationError
from imgembed.store.base import CollectionInfo, Hit, Provenance, Record, VectorStore


def open_store(settings: Settings) -> VectorStore:
    """The store the settings name: Qdrant (server at IMGEMBED_QDRANT_URL, else local files
    under the data directory), or Postgres (IMGEMBED_DATABASE_URL, else the embedded one)."""
    if settings.store == "qdrant":
        from imgembed.store.qdrant import QdrantStore

        if settings.qdrant_url:
            return QdrantStore(
                url=settings.qdrant_url,
                api_key=settings.qdrant_api_key,
                timeout=settings.qdrant_timeout,
            )
        return QdrantStore(path=make_data_dir(settings.data_dir) / "qdrant")
    from imgembed.store.postgres import PostgresStore

    target = postgres_target(settings)
    return PostgresStore(
        target.url,
        ef_search=settings.hnsw_ef_search,
        defer_index_min=settings.defer_index_min,
        location=target.location,
        reopen=target.reopen,
        reconnect_seconds=target.reconnect_seconds,
    )


def check_processes(settings: Settings, processes: int) -> None:
    """ConfigurationError if `processes` would share a store that serves one process at a
    time: Qdrant's local files (the first holds them; every other would be StoreBusyError
    for as long as it runs)."""
    if processes > 1 and settings.store == "qdrant" and not settings.qdrant_url:
        raise ConfigurationError(
            f"{processes} processes cannot share Qdrant's local files (one process at a "
            "time: the others' store requests would all be refused as busy): serve with "
            "--workers 1, or set IMGEMBED_QDRANT_URL to a Qdrant server"
        )


class PostgresTarget(NamedTuple):
    url: str
    location: str | None  # where the data lives, for messages (None: the URL's host)
    reopen: Callable[[], str] | None  # the URL again after the server went away
    reconnect_seconds: float  # how long a call waits for it to come back


def postgres_target(settings: Settings) -> PostgresTarget:
    """IMGEMBED_DATABASE_URL, or the embedded server (started or joined; restarted by
    `reopen` if it dies)."""
    wait = settings.db_reconnect_timeout
    if settings.database_url:
        return PostgresTarget(settings.database_url, None, None, wait)
    from imgembed.store import embedded

    folder = settings.data_dir
    return PostgresTarget(
        embedded.start(folder),
        str(embedded.pgdata(folder)),
        lambda: embedded.start(folder, revive_seconds=wait),
        wait,
    )


def keep_embedded(settings: Settings, seconds: float, runner: str) -> float:
    """Keep the embedded server up for `seconds` (`imgembed db start`); its end (epoch).
    With IMGEMBED_DATABASE_URL there is none to keep: a ConfigurationError."""
    if settings.database_url:
        raise ConfigurationError(
            "IMGEMBED_DATABASE_URL names an external PostgreSQL: there is no embedded server "
            "to start or keep up"
        )
    from imgembed.store import embedded

    return embedded.keep(settings.data_dir, seconds, runner=runner)


__all__ = [
    "CollectionInfo",
    "Hit",
    "PostgresTarget",
    "Provenance",
    "Record",
    "VectorStore",
    "check_processes",
    "keep_embedded",
    "open_store",
    "postgres_target",
]
