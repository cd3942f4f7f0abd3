"""Vector stores: PostgreSQL + pgvector (the embedded default, or any server) and Qdrant."""

from __future__ import annotations

from imgembed.config import Settings
from imgembed.store.base import CollectionInfo, Hit, Provenance, Record, VectorStore


def open_store(settings: Settings) -> VectorStore:
    """The store the settings name: Qdrant (server at IMGEMBED_QDRANT_URL, else local files
    under the data directory), or Postgres (IMGEMBED_DATABASE_URL, else the embedded one)."""
    if settings.store == "qdrant":
        from imgembed.store.qdrant import QdrantStore

        if settings.qdrant_url:
            return QdrantStore(url=settings.qdrant_url, api_key=settings.qdrant_api_key)
        return QdrantStore(path=settings.data_dir / "qdrant")
    from imgembed.store.postgres import PostgresStore

    if settings.database_url:
        return PostgresStore(settings.database_url, ef_search=settings.hnsw_ef_search)
    from imgembed.store import embedded

    return PostgresStore(
        postgres_url(settings),
        ef_search=settings.hnsw_ef_search,
        location=str(embedded.pgdata(settings.data_dir)),
        reopen=lambda: embedded.start(settings.data_dir),  # restarts a server that died
    )


def postgres_url(settings: Settings) -> str:
    """IMGEMBED_DATABASE_URL if set, else the embedded server's (started or joined)."""
    if settings.database_url:
        return settings.database_url
    from imgembed.store import embedded

    return embedded.start(settings.data_dir)


__all__ = [
    "CollectionInfo",
    "Hit",
    "Provenance",
    "Record",
    "VectorStore",
    "open_store",
    "postgres_url",
]
