"""VectorStore on PostgreSQL + pgvector (embedded, or any server via IMGEMBED_DATABASE_URL).

The schema comes from Alembic migrations (store/migrations): a registry of collections, and
per collection a table of its own with a `vector(dimension)` column and an HNSW index (see
`_table_ddl`, `_index_ddl`). Every call runs through pgconn.Connection: typed errors, and one
retry after a lost connection."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import psutil
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from imgembed.errors import CollectionNotFoundError, ProvenanceMismatchError, StoreError
from imgembed.store.base import (
    CollectionInfo,
    Hit,
    Provenance,
    Record,
    StoredItem,
    busy,
    checked_filter,
    checked_metadata,
    checked_name,
    checked_query,
    checked_record,
    checked_text,
    dropped,
    storable_ids,
    vector_size,
)
from imgembed.store.faults import store_errors
from imgembed.store.pgconn import Connection

log = logging.getLogger(__name__)
T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA = "0004"  # the newest migration (a test holds it equal to Alembic's head)
HNSW_MAX_DIMENSION = 4000  # pgvector's limit for an index over halfvec; above it: exact search
DEFER_INDEX_MIN = 5000  # the smallest bulk load that builds its index afterwards
# Deletes and drops (on a connection of their own) wait this long at most for a lock, as an
# index build holds one for minutes: then StoreBusyError, "run it again".
LOCK_TIMEOUT = "SET LOCAL lock_timeout = '5s'"


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option(
        "sqlalchemy.url", url.replace("postgresql://", "postgresql+psycopg://", 1)
    )
    return config


_migrating = threading.Lock()


def migrate(url: str, location: str | None = None) -> None:
    """Bring the schema to the newest revision (safe to run from many processes at once).
    A schema already there is told by one query: importing Alembic and SQLAlchemy alone
    would cost a short command most of its time (measured 1.3 s of `imgembed search`)."""
    where = location or describe_url(url)
    with store_errors("reading the schema revision", where), psycopg.connect(url) as connection:
        if _revision(connection) == SCHEMA:
            return
    from alembic import command

    # Alembic's `context` is one per process: two threads migrating at once ran each other's
    # statements and hung (other processes wait on the migration lock in env.py instead)
    with _migrating, store_errors("migrating the schema", where):
        command.upgrade(_alembic_config(url), "head")


def _revision(connection: psycopg.Connection) -> str | None:
    if connection.execute("SELECT to_regclass('alembic_version')").fetchone()[0] is None:
        return None
    row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def revisions(url: str) -> tuple[str | None, str]:
    """(the database's revision, the newest one the code knows)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(url)).get_current_head() or ""
    where = describe_url(url)
    with store_errors("reading the schema revision", where), psycopg.connect(url) as connection:
        return _revision(connection), head


def describe_url(url: str) -> str:
    """Where a server is, for messages: host, port and database, never the password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "the configured PostgreSQL"
    host = info.get("host") or "localhost"
    return f"PostgreSQL at {host}:{info.get('port') or 5432}/{info.get('dbname') or ''}"


class _Collection(NamedTuple):
    table: str  # the collection's own items table
    dimension: int


class PostgresStore:
    backend = "postgres"

    def __init__(
        self,
        url: str,
        upgrade: bool = True,
        ef_search: int = 100,
        *,
        defer_index_min: int = DEFER_INDEX_MIN,
        location: str | None = None,
        reopen: Callable[[], str] | None = None,
        reconnect_seconds: float | None = None,
    ):
        """`location` names where the data lives (the embedded server's folder); `reopen`
        gives the URL again after the server went away (the embedded one restarts it), waited
        for `reconnect_seconds` (pgconn.RECONNECT_SECONDS); `defer_index_min`: the smallest
        bulk load that builds its index afterwards (0: never)."""
        self.url = url
        self.location = location or describe_url(url)
        self.ef_search = ef_search  # HNSW candidates per query: recall against latency
        self.defer_index_min = defer_index_min
        if upgrade:
            migrate(url, self.location)
        self._db = Connection(url, self.location, reopen, reconnect_seconds)
        self._collections: dict[str, _Collection] = {}
        self._staging: psycopg.Connection | None = None  # the connection with a staging table

    def _collection(self, name: str, size: int | None = None) -> _Collection:
        """The collection's table and dimension, without counting its rows (every search).
        Read again when a vector of another `size` comes: another process may have made the
        collection again with another model since (a long-lived service, the resident search
        process)."""
        known = self._collections.get(name)
        if known is None or (size is not None and size != known.dimension):
            row = self._query(
                f"reading collection {name!r}",
                "SELECT items_table, dimension FROM imgembed_collections WHERE name = %s",
                (checked_text(name, "collection name"),),
            )
            if not row:
                raise CollectionNotFoundError(f"no collection {name!r}")
            self._collections[name] = _Collection(*row[0])
        return self._collections[name]

    def _on(
        self,
        name: str,
        action: str,
        work: Callable[[psycopg.Connection], T],
        alone: bool = False,
        waiting: Callable[[str], None] | None = None,
    ) -> T:
        """Work on the collection's table (long work `alone`, on a connection of its own,
        with `waiting` as `Connection.alone` takes it): a table another process dropped
        meanwhile is CollectionNotFoundError, not a driver error."""
        try:
            if alone:
                return self._db.alone(action, work, waiting=waiting)
            return self._db.run(action, work)
        except StoreError as exc:
            if not isinstance(exc.__cause__, psycopg.errors.UndefinedTable):
                raise
            self._collections.pop(name, None)
            raise dropped(name, action) from exc

    # -- collections -------------------------------------------------------------------------

    def checked_name(self, name: str) -> str:
        return checked_name(name)

    def create_collection(self, name: str, provenance: Provenance) -> CollectionInfo:
        checked_name(name)

        def create(connection: psycopg.Connection) -> None:
            with connection.transaction():
                # one creator at a time: concurrent CREATE TABLE IF NOT EXISTS can collide
                connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))
                connection.execute(
                    "INSERT INTO imgembed_collections"
                    " (name, model, pretrained, dimension, preprocess, items_table)"
                    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING",
                    (name, provenance.model, provenance.pretrained, provenance.dimension,
                     provenance.preprocess, items_table(name)),
                )  # fmt: skip
                table, dimension = connection.execute(
                    "SELECT items_table, dimension FROM imgembed_collections WHERE name = %s",
                    (name,),
                ).fetchone()
                # A new table (or one gone) gets its index at once, being empty. An existing
                # table's missing index (a bulk load stopped before its build) is left to the
                # run's `refresh`: built here, it would hold the shared connection, and every
                # search of the server, for minutes.
                if connection.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
                    for statement in _table_ddl(table, dimension):
                        connection.execute(statement)
                    if dimension <= HNSW_MAX_DIMENSION:
                        connection.execute(_index_ddl(table, dimension))

        self._db.run(f"creating collection {name!r}", create)
        info = self.get_collection(name)
        if info.provenance != provenance:
            raise ProvenanceMismatchError(
                f"collection {name!r} holds vectors of {info.provenance.describe()}; "
                f"they cannot be mixed with {provenance.describe()}"
            )
        return info

    def get_collection(self, name: str) -> CollectionInfo:
        checked_text(name, "collection name")
        infos = self._infos(f"reading collection {name!r}", "WHERE name = %s", (name,))
        if not infos:
            raise CollectionNotFoundError(f"no collection {name!r}")
        return infos[0]

    def provenance(self, name: str) -> Provenance:
        row = self._query(
            f"reading the provenance of {name!r}",
            "SELECT model, pretrained, dimension, preprocess FROM imgembed_collections"
            " WHERE name = %s",
            (name,),
        )
        if not row:
            raise CollectionNotFoundError(f"no collection {name!r}")
        return Provenance(*row[0])

    def collections(self) -> list[CollectionInfo]:
        return self._infos("listing collections", "", ())

    def _infos(self, action: str, where: str, params: tuple[Any, ...]) -> list[CollectionInfo]:
        def read(connection: psycopg.Connection) -> list[CollectionInfo]:
            rows = connection.execute(
                "SELECT name, model, pretrained, dimension, preprocess, items_table"
                f" FROM imgembed_collections {where} ORDER BY name",
                params,
            ).fetchall()
            return [
                CollectionInfo(name, "postgres", Provenance(*provenance), _count(connection, table))
                for name, *provenance, table in rows
            ]

        return self._db.run(action, read)

    def drop_collection(self, name: str) -> None:
        table = self._collection(name).table
        self._collections.pop(name, None)

        def drop(connection: psycopg.Connection) -> None:
            with connection.transaction():
                connection.execute(LOCK_TIMEOUT)
                connection.execute("DELETE FROM imgembed_collections WHERE name = %s", (name,))
                connection.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))

        self._db.alone(f"dropping collection {name!r}", drop)  # may wait: see LOCK_TIMEOUT

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[None]:
        """One run per collection: a session advisory lock (store/pgconn.py)."""
        with self._db.session_lock(
            _lock_key(name), f"locking collection {name!r}", lambda: busy(name)
        ):
            yield

    def check_not_busy(self, name: str) -> None:
        free = self._db.run(
            f"checking the lock of collection {name!r}",
            lambda c: c.execute(
                "SELECT CASE WHEN pg_try_advisory_lock(hashtextextended(%(k)s, 0))"
                " THEN pg_advisory_unlock(hashtextextended(%(k)s, 0)) ELSE false END",
                {"k": _lock_key(name)},
            ).fetchone()[0],
        )
        if not free:
            raise busy(name)

    # -- items -------------------------------------------------------------------------------

    def upsert(self, name: str, records: Sequence[Record]) -> None:
        """One transaction: COPY (binary) into a staging table, then one INSERT ... ON
        CONFLICT into the collection (rows in id order, so that concurrent writers of
        overlapping batches lock in the same order and cannot deadlock)."""
        if not records:
            return
        table, dimension = self._collection(name, vector_size(records[0].vector))
        rows = {}
        for record in records:  # of equal ids, the last wins
            vector, metadata = checked_record(record, dimension)
            rows[record.id] = (record.id, vector, record.content_hash, record.source, metadata)
        insert = sql.SQL(
            "INSERT INTO {table} (id, embedding, content_hash, source, metadata)"
            " SELECT id, embedding, content_hash, source, metadata::jsonb"
            " FROM imgembed_staging ORDER BY id"
            " ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding,"
            " content_hash = EXCLUDED.content_hash, source = EXCLUDED.source,"
            " metadata = EXCLUDED.metadata, updated_at = now()"
        ).format(table=sql.Identifier(table))

        def write(connection: psycopg.Connection) -> None:
            if self._staging is not connection:  # made outside the transaction: a failed one
                connection.execute(  # would take it along
                    "CREATE TEMP TABLE IF NOT EXISTS imgembed_staging (id text, embedding vector,"
                    " content_hash text, source text, metadata text) ON COMMIT DELETE ROWS"
                )
                self._staging = connection
            with connection.transaction(), connection.cursor() as cursor:
                with cursor.copy("COPY imgembed_staging FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["text", "vector", "text", "text", "text"])
                    for row in rows.values():
                        copy.write_row(row)
                cursor.execute(insert)

        self._on(name, f"storing {len(rows)} items in {name!r}", write)

    def get(self, name: str, ids: Iterable[str]) -> list[Record]:
        rows = self._items(
            name, "reading items of",
            "SELECT id, embedding, content_hash, source, metadata FROM {table}"
            " WHERE id = ANY(%s) ORDER BY id",
            (storable_ids(ids),),
        )  # fmt: skip
        return [Record(r[0], _array(r[1]), r[2], r[3], r[4]) for r in rows]

    def hashes(self, name: str) -> dict[str, str]:
        rows = self._items(
            name, "reading the content hashes of", "SELECT id, content_hash FROM {table}"
        )
        return dict(rows)

    def stored_items(self, name: str) -> dict[str, StoredItem]:
        rows = self._items(
            name,
            "reading what is stored in",
            "SELECT id, content_hash, source, metadata FROM {table}",
        )
        return {row[0]: StoredItem(row[1], row[2], row[3] or {}) for row in rows}

    def delete(self, name: str, ids: Iterable[str]) -> int:
        ids = storable_ids(ids)
        statement = sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(
            sql.Identifier(self._collection(name).table)
        )

        def delete(connection: psycopg.Connection) -> int:
            with connection.transaction():
                connection.execute(LOCK_TIMEOUT)
                return connection.execute(statement, (ids,)).rowcount

        # alone: a delete waiting behind a build would hold every search of the server
        return self._on(name, f"deleting {len(ids)} items from {name!r}", delete, alone=True)

    def count(self, name: str) -> int:
        table = self._collection(name).table
        return self._on(name, f"counting {name!r}", lambda c: _count(c, table))

    def search(
        self,
        name: str,
        vector: np.ndarray,
        top_k: int = 10,
        filters: Mapping[str, Any] | None = None,
        exact: bool = False,
    ) -> list[Hit]:
        """One statement, prepared after its first use. The approximate order is that of
        the half-precision index; scores are the full-precision cosine."""
        table, dimension = self._collection(name, vector_size(vector))
        query = checked_query(vector, dimension)
        params: dict[str, Any] = {"q": query}
        where = sql.SQL("")
        if filters:
            where, matches = _filter(filters)
            params.update(matches)
        order = sql.SQL("embedding <=> %(q)s")  # no index serves it: every row is compared
        if not exact and dimension <= HNSW_MAX_DIMENSION:
            order = sql.SQL("embedding::halfvec({d}) <=> %(q)s::halfvec({d})").format(
                d=sql.Literal(dimension)
            )
        statement = sql.SQL(
            "SELECT id, 1 - (embedding <=> %(q)s), source, content_hash, metadata"
            " FROM {table}{where} ORDER BY {order} LIMIT {k}"  # k literal: a plan per k
        ).format(table=sql.Identifier(table), where=where, order=order, k=sql.Literal(top_k))
        ef = max(self.ef_search, 2 * top_k)  # enough candidates for k

        def find(connection: psycopg.Connection) -> list[tuple[Any, ...]]:
            self._db.search_settings(connection, ef, filtered=bool(filters))
            return connection.execute(statement, params, prepare=True).fetchall()

        rows = self._on(name, f"searching {name!r}", find)
        hits = [Hit(r[0], float(r[1]), r[2], r[3], r[4]) for r in rows]
        return sorted(hits, key=lambda hit: -hit.score)  # relaxed order: re-sort the k rows

    # -- bulk loads --------------------------------------------------------------------------

    def bulk_load(self, name: str, incoming: int) -> bool:
        """Before storing `incoming` new items. A bulk load (at least `defer_index_min` items,
        and at least half as many as the collection holds) sets the HNSW index aside: one
        build after the load is several times cheaper than keeping the graph up to date
        insert by insert. Searches meanwhile compare every row (exact, slower). `refresh`
        builds it again; a run stopped before that leaves it to the next `refresh`."""
        table, dimension = self._collection(name)
        if not self.defer_index_min or incoming < self.defer_index_min:
            return False
        if dimension > HNSW_MAX_DIMENSION or 2 * incoming < self.count(name):
            return False
        index = sql.Identifier(f"{table}_hnsw")
        self._db.run(
            f"setting the search index of {name!r} aside for a bulk load",
            lambda c: c.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(index)),
        )
        log.info("bulk load of %d items into %r: its HNSW index is built afterwards", incoming,
                 name)  # fmt: skip
        return True

    def refresh(
        self, name: str, changed: bool = True, waiting: Callable[[str], None] | None = None
    ) -> None:
        """After a run: build the HNSW index if a bulk load set it aside, and refresh the
        planner's statistics (without them it scans instead of using the index) when rows
        `changed` or the index was built (ANALYZE of 100k rows: 0.4-0.9 s)."""
        table, dimension = self._collection(name)
        index = f"{table}_hnsw"
        exists = self._on(
            name,
            f"reading the search index of {name!r}",
            lambda c: c.execute("SELECT to_regclass(%s)", (index,)).fetchone()[0],
        )
        build = dimension <= HNSW_MAX_DIMENSION and exists is None
        if not (build or changed):
            return

        def work(connection: psycopg.Connection) -> None:
            if build:
                with connection.transaction():
                    memory = build_memory(_count(connection, table), dimension)
                    connection.execute(
                        sql.SQL("SET LOCAL maintenance_work_mem = {}").format(
                            sql.Literal(f"{memory}MB")
                        )
                    )
                    connection.execute(_index_ddl(table, dimension))
            connection.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))

        # alone: a build takes a minute per 100k items, searches meanwhile go on
        action = "building the search index" if build else "refreshing the search statistics"
        self._on(name, f"{action} of {name!r}", work, True, waiting)

    def close(self) -> None:
        self._db.close()

    def _query(self, action: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self._db.run(action, lambda c: c.execute(statement, params).fetchall())

    def _items(
        self, name: str, action: str, statement: str, params: Any = None
    ) -> list[tuple[Any, ...]]:
        query = sql.SQL(statement).format(table=sql.Identifier(self._collection(name).table))
        return self._on(name, f"{action} {name!r}", lambda c: c.execute(query, params).fetchall())


def _lock_key(collection: str) -> str:
    return f"imgembed-index:{collection}"


def items_table(collection: str) -> str:
    """Each collection has a table of its own, its vectors in a column of its dimension."""
    return "imgembed_items_" + hashlib.sha256(collection.encode()).hexdigest()[:16]


def _table_ddl(table: str, dimension: int) -> list[sql.Composed]:
    """The vectors stay in the row (no TOAST: a 512-d vector is just over its 2 KB
    threshold, and fetching it from the TOAST table costs an index lookup per row)."""
    names = {"t": sql.Identifier(table), "d": sql.Literal(dimension),
             "metadata": sql.Identifier(f"{table}_metadata")}  # fmt: skip
    return [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {t} (id text PRIMARY KEY,"
            " embedding vector({d}) NOT NULL, content_hash text NOT NULL, source text NOT NULL,"
            " metadata jsonb NOT NULL DEFAULT '{{}}', updated_at timestamptz NOT NULL"
            " DEFAULT now()) WITH (toast_tuple_target = 8160)"
        ).format(**names),
        sql.SQL("ALTER TABLE {t} ALTER COLUMN embedding SET STORAGE EXTERNAL").format(**names),
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {metadata} ON {t} USING gin (metadata jsonb_path_ops)"
        ).format(**names),
    ]


def _index_ddl(table: str, dimension: int) -> sql.Composed:
    """HNSW over the vectors in half precision: half the size of a full-precision graph
    (100k x 512: 130 against 260 MB), so more of it stays in memory (measured with 128 MB of
    shared buffers, ef_search 100: 5.8 against 12.1 ms, recall 0.948 against 0.947); the
    order among the k found is set by the full-precision scores."""
    return sql.SQL(
        "CREATE INDEX IF NOT EXISTS {index} ON {t} USING hnsw"
        " ((embedding::halfvec({d})) halfvec_cosine_ops)"
    ).format(
        index=sql.Identifier(f"{table}_hnsw"), t=sql.Identifier(table), d=sql.Literal(dimension)
    )


def build_memory(rows: int, dimension: int) -> int:
    """maintenance_work_mem (MB) for an HNSW build to stay in memory (it slows down sharply
    once the graph spills), at most an eighth of this machine's memory: builds may run two at
    once (a server's jobs side by side, another process)."""
    need = rows * (2 * dimension + 400) * 1.3 / 2**20
    ceiling = psutil.virtual_memory().total / 8 / 2**20
    return int(max(64, min(need, ceiling)))


def _count(connection: psycopg.Connection, table: str) -> int:
    statement = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
    return connection.execute(statement).fetchone()[0]


def _array(value: Any) -> np.ndarray:
    raw = value.to_numpy() if hasattr(value, "to_numpy") else value
    return np.asarray(raw, dtype=np.float32)


def _filter(filters: Mapping[str, Any]) -> tuple[sql.Composable, dict[str, str]]:
    """`metadata @> {key: value}` for each key (JSON containment: a list by its values); an
    object by each of its keys in turn, so that at any depth a single value also matches a
    list that holds it (tags=sale finds ["sale", "new"]), as Qdrant matches it."""
    checked_filter(filters)
    parts, params = [], {}
    for n, (path, value) in enumerate(_leaves(filters)):
        params[f"f{n}"] = checked_metadata(_nested(path, value), "the search filter")
        part = sql.SQL("metadata @> {}::jsonb").format(sql.Placeholder(f"f{n}"))
        if not isinstance(value, Mapping | list | tuple):
            params[f"l{n}"] = checked_metadata(_nested(path, [value]), "the search filter")
            part = sql.SQL("({} OR metadata @> {}::jsonb)").format(part, sql.Placeholder(f"l{n}"))
        parts.append(part)
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(parts), params


def _leaves(value: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[Any, Any]]:
    """(the keys down to it, a value that is no object with keys) for each such value."""
    for key, item in value.items():
        if isinstance(item, Mapping) and item:
            yield from _leaves(item, (*path, key))
        else:
            yield (*path, key), item


def _nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    for key in reversed(path):
        value = {key: value}
    return value
