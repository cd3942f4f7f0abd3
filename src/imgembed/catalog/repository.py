"""All SQL of the product catalogue (tables from migration 0002): products per store, each
store's provenance, per-store HNSW indexes, the bulk job's reads and atomic batch writes, and
search. Driver errors become typed StoreErrors (store/faults.py) and a lost connection is
made again on the next call, through the stores' own connection (store/pgconn.py).

Vectors are unit length (text, image) or fused (combined), so every index uses inner product
(pgvector `<#>`, the negative inner product). An index per store and column is partial
(`WHERE store_id = '<id>'`) on the column cast to its store's dimension; queries name the store
as a literal so the planner can use it. Columns of up to 4,000 dimensions (pgvector's limit
for `halfvec`; e.g. CLIP 512 + text-embedding-3-small 1536 = 2048) are indexed in half
precision and the few candidates scored in full precision; wider ones are searched exactly."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from imgembed.catalog.product_indexes import (
    INDEX_DDL,
    PARTS,
    index_ddl,
    index_name,
    index_names,
    missing_parts,
    ranked,
)
from imgembed.catalog.products import FIELD_PART, ProductInput
from imgembed.catalog.records import (
    EmbeddedProduct,
    FailedProduct,
    PlanRow,
    Stored,
    StoreProvenance,
)
from imgembed.config import Settings
from imgembed.errors import StoreBusyError
from imgembed.store import postgres_target
from imgembed.store.base import never_stored, storable_ids
from imgembed.store.pgconn import Connection
from imgembed.store.postgres import build_memory, describe_url, migrate

log = logging.getLogger(__name__)
_PRODUCT_FIELDS = (
    "title",
    "description",
    "category",
    "price",
    "currency",
    "image_url",
    "extra_image_urls",
    "attributes",
)


class ProductRepository:
    def __init__(
        self,
        url: str,
        upgrade: bool = True,
        *,
        location: str | None = None,
        reopen: Callable[[], str] | None = None,
        reconnect_seconds: float | None = None,
    ):
        """`location` names where the data lives, for messages; `reopen` gives the URL again
        after the server went away (the embedded one restarts it), waited for
        `reconnect_seconds` (pgconn.RECONNECT_SECONDS)."""
        self.url = url
        self.location = location or describe_url(url)
        self._same = {"location": self.location, "reopen": reopen,
                      "reconnect_seconds": reconnect_seconds}  # fmt: skip
        if upgrade:
            migrate(url, self.location)
        self._db = Connection(url, self.location, reopen, reconnect_seconds)

    @classmethod
    def for_settings(cls, settings: Settings, upgrade: bool = True) -> ProductRepository:
        """The catalogue always lives in PostgreSQL: IMGEMBED_DATABASE_URL, else the embedded
        server."""
        target = postgres_target(settings)
        return cls(
            target.url,
            upgrade,
            location=target.location,
            reopen=target.reopen,
            reconnect_seconds=target.reconnect_seconds,
        )

    def session(self) -> ProductRepository:
        """Another connection to the same database (a bulk job's own, for its store lock)."""
        return ProductRepository(self.url, False, **self._same)

    def _cursor(
        self, what: str, transaction: bool = False
    ) -> contextlib.AbstractContextManager[psycopg.Cursor[Any]]:
        return self._db.cursor(what, transaction)

    def close(self) -> None:
        self._db.close()

    # -- products --------------------------------------------------------------------------

    def upsert_products(
        self, store_id: str, products: Sequence[ProductInput]
    ) -> tuple[int, int, int]:
        """Insert or update by (store_id, product_id) in one transaction; an update sets the
        parts each row names and keeps the others; rows whose data is unchanged are left
        alone. Returns (inserted, updated, unchanged)."""
        columns = sql.SQL(", ").join(map(sql.Identifier, _PRODUCT_FIELDS))
        current = sql.SQL(", ").join(
            sql.SQL("imgembed_products.{}").format(sql.Identifier(f)) for f in _PRODUCT_FIELDS
        )
        updated_to = sql.SQL(", ").join(
            sql.SQL("CASE WHEN {given} THEN EXCLUDED.{f} ELSE imgembed_products.{f} END").format(
                given=sql.Placeholder(f"given_{f}"), f=sql.Identifier(f)
            )
            for f in _PRODUCT_FIELDS
        )
        values = sql.SQL(", ").join(
            map(sql.Placeholder, ("store_id", "product_id", *_PRODUCT_FIELDS))
        )
        statement = sql.SQL(
            "INSERT INTO imgembed_products (store_id, product_id, {columns}) VALUES ({values})"
            " ON CONFLICT (store_id, product_id) DO UPDATE SET ({columns}) = ({updated_to}),"
            " updated_at = now() WHERE ({current}) IS DISTINCT FROM ({updated_to})"
            " RETURNING (xmax = 0)"
        ).format(columns=columns, values=values, updated_to=updated_to, current=current)
        params = [
            {
                "store_id": store_id,
                "product_id": p.product_id,
                "title": p.title,
                "description": p.description,
                "category": p.category,
                "price": p.price,
                "currency": p.currency,
                "image_url": p.image_url,
                "extra_image_urls": list(p.extra_image_urls),
                "attributes": Jsonb(p.attributes),
                **{f"given_{f}": FIELD_PART.get(f, f) in p.given for f in _PRODUCT_FIELDS},
            }
            # in key order: two imports of overlapping products lock their rows in the same
            # order, so one waits for the other instead of both deadlocking
            for p in sorted(products, key=lambda p: p.product_id)  # stable: the last one wins
        ]
        if not params:
            return 0, 0, 0

        def write(connection: psycopg.Connection[Any]) -> tuple[int, int]:
            inserted = updated = 0
            with connection.cursor() as cursor:
                cursor.executemany(statement, params, returning=True)
                for _ in cursor.results():
                    row = cursor.fetchone()
                    if row is not None:
                        inserted += row[0]
                        updated += not row[0]
            return inserted, updated

        # Repeatable (an upsert by key), so a lost connection is made again and it is retried;
        # one whose commit was made keeps the counts it had (a repeat counts it unchanged).
        inserted, updated = self._db.run("storing products", write, transaction=True)
        return inserted, updated, len(params) - inserted - updated

    def product(self, store_id: str, product_id: str) -> dict[str, Any] | None:
        if never_stored(store_id, product_id):
            return None  # a NUL: never stored (PostgreSQL text cannot hold it)
        with self._cursor("reading a product") as cursor:
            cursor.execute(
                "SELECT product_id, title, description, category, price, currency, image_url,"
                " extra_image_urls, attributes, status, last_error, error_type, attempts,"
                " weight_category, image_weight, text_weight, text_model, image_model,"
                " weights_version, image_hash, text_hash, created_at, updated_at, embedded_at,"
                " combined_embedding IS NOT NULL AND image_embedding IS NULL AS text_only"
                " FROM imgembed_products WHERE store_id = %s AND product_id = %s",
                (store_id, product_id),
            )
            row = cursor.fetchone()
            names = [c.name for c in cursor.description or []]
        return dict(zip(names, row, strict=True)) if row else None

    def unknown(self, store_id: str, product_ids: Sequence[str]) -> list[str]:
        """Those of the ids that name no product in the store, in the order given."""
        if never_stored(store_id):
            return list(product_ids)
        with self._cursor("looking up products") as cursor:
            cursor.execute(
                "SELECT product_id FROM imgembed_products"
                " WHERE store_id = %s AND product_id = ANY(%s)",
                (store_id, storable_ids(product_ids)),
            )
            known = {row[0] for row in cursor.fetchall()}
        return [product_id for product_id in product_ids if product_id not in known]

    def count(self, store_id: str) -> int:
        if never_stored(store_id):
            return 0
        with self._cursor("counting products") as cursor:
            cursor.execute(
                "SELECT count(*) FROM imgembed_products WHERE store_id = %s", (store_id,)
            )
            return cursor.fetchone()[0]

    # -- provenance and indexes -------------------------------------------------------------

    def provenance(self, store_id: str) -> tuple[StoreProvenance, str] | None:
        """The store's provenance and the weights version of its last embed run."""
        if never_stored(store_id):
            return None
        with self._cursor("reading the store's provenance") as cursor:
            cursor.execute(
                "SELECT image_model, image_pretrained, image_preprocess, image_dimension,"
                " text_model, text_dimension, weights_version"
                " FROM imgembed_product_stores WHERE store_id = %s",
                (store_id,),
            )
            row = cursor.fetchone()
        return (StoreProvenance(*row[:6]), row[6]) if row else None

    def set_provenance(
        self, store_id: str, provenance: StoreProvenance, weights_version: str, reset: bool
    ) -> None:
        """Record the store's provenance and build its indexes. With `reset`, first forget
        every vector of the store (another model's vectors must never be mixed in), all in
        one transaction; the indexes are then left to the run's end (`refresh`): until this
        commits the old vectors' row versions are still there, of another dimension perhaps,
        and a build here would read them."""
        values = (
            store_id,
            provenance.image_model,
            provenance.image_pretrained,
            provenance.image_preprocess,
            provenance.image_dimension,
            provenance.text_model,
            provenance.text_dimension,
            weights_version,
        )
        with self._cursor("recording the store's provenance", transaction=True) as cursor:
            if reset:
                cursor.execute(
                    "UPDATE imgembed_products SET text_embedding = NULL, image_embedding = NULL,"
                    " combined_embedding = NULL, text_hash = NULL, image_hash = NULL,"
                    " embedded_image_url = NULL, status = 'pending', updated_at = now()"
                    " WHERE store_id = %s",
                    (store_id,),
                )
                for part in PARTS:
                    cursor.execute(
                        sql.SQL("DROP INDEX IF EXISTS {}").format(
                            sql.Identifier(index_name(store_id, part))
                        )
                    )
            cursor.execute(
                "INSERT INTO imgembed_product_stores (store_id, image_model, image_pretrained,"
                " image_preprocess, image_dimension, text_model, text_dimension, weights_version)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (store_id) DO UPDATE SET"
                " (image_model, image_pretrained, image_preprocess, image_dimension, text_model,"
                " text_dimension, weights_version) = (EXCLUDED.image_model,"
                " EXCLUDED.image_pretrained, EXCLUDED.image_preprocess,"
                " EXCLUDED.image_dimension, EXCLUDED.text_model, EXCLUDED.text_dimension,"
                " EXCLUDED.weights_version), updated_at = now()",
                values,
            )
            if not reset:
                for statement in index_ddl(store_id, provenance).values():
                    cursor.execute(statement)

    def set_weights_version(self, store_id: str, version: str) -> None:
        with self._cursor("recording the weights version") as cursor:
            cursor.execute(
                "UPDATE imgembed_product_stores SET weights_version = %s, updated_at = now()"
                " WHERE store_id = %s",
                (version, store_id),
            )

    @contextlib.contextmanager
    def store_lock(self, store_id: str) -> Iterator[None]:
        """One bulk job per store at a time (a session lock: a killed job's ends with it)."""
        with self._db.session_lock(
            _lock_key(store_id), "locking the store", lambda: _busy(store_id)
        ):
            yield

    def check_not_busy(self, store_id: str) -> None:
        """StoreBusyError if a bulk job holds the store now (taken and let go at once)."""
        with self._cursor("checking the store lock") as cursor:
            cursor.execute(
                "SELECT CASE WHEN pg_try_advisory_lock(hashtextextended(%(k)s, 0))"
                " THEN pg_advisory_unlock(hashtextextended(%(k)s, 0)) ELSE false END",
                {"k": _lock_key(store_id)},
            )
            if not cursor.fetchone()[0]:
                raise _busy(store_id)

    # -- the bulk job -----------------------------------------------------------------------

    def plan_rows(self, store_id: str, product_ids: Iterable[str] | None = None) -> list[PlanRow]:
        where = sql.SQL("store_id = %s")
        params: list[Any] = [store_id]
        if product_ids is not None:
            where = sql.SQL("{} AND product_id = ANY(%s)").format(where)
            params.append(list(product_ids))
        with self._cursor("reading the products to embed") as cursor:
            cursor.execute(
                sql.SQL(
                    "SELECT product_id, title, description, category, price, currency,"
                    " image_url, status, text_hash, embedded_image_url,"
                    " text_embedding IS NOT NULL, image_embedding IS NOT NULL,"
                    " combined_embedding IS NOT NULL, weight_category, image_weight, text_weight"
                    " FROM imgembed_products WHERE {} ORDER BY product_id"
                ).format(where),
                params,
            )
            return [PlanRow(*row) for row in cursor.fetchall()]

    def mark_to_redo(self, store_id: str, product_ids: Sequence[str]) -> None:
        """Embedded products a forced run will do again: pending until it has (a failed one
        keeps its error, and is retried anyway)."""
        with self._cursor("marking the products to embed again", transaction=True) as cursor:
            cursor.execute(
                "UPDATE imgembed_products SET status = 'pending' WHERE store_id = %s"
                " AND product_id = ANY(%s) AND status = 'embedded'",
                (store_id, list(product_ids)),
            )

    def stored_vectors(self, store_id: str, product_ids: Sequence[str]) -> dict[str, Stored]:
        """What is stored for products whose text or image need not be embedded again."""
        if not product_ids:
            return {}
        with self._cursor("reading stored vectors") as cursor:
            cursor.execute(
                "SELECT product_id, text_embedding, image_embedding, image_hash"
                " FROM imgembed_products WHERE store_id = %s AND product_id = ANY(%s)",
                (store_id, list(product_ids)),
            )
            return {r[0]: Stored(_array(r[1]), _array(r[2]), r[3]) for r in cursor.fetchall()}

    def save_batch(
        self,
        store_id: str,
        provenance: StoreProvenance,
        weights_version: str,
        embedded: Sequence[EmbeddedProduct],
        failed: Sequence[FailedProduct],
    ) -> None:
        """A batch's outcomes in one transaction: a kill loses at most this batch."""
        image_model = (
            f"{provenance.image_model} ({provenance.image_pretrained}) "
            f"preprocess {provenance.image_preprocess}"
        )

        def write(connection: psycopg.Connection[Any]) -> None:
            with connection.cursor() as cursor:
                if embedded:
                    cursor.executemany(
                        "UPDATE imgembed_products SET text_embedding = %s, image_embedding = %s,"
                        " combined_embedding = %s, text_model = %s, image_model = %s,"
                        " weights_version = %s, weight_category = %s, image_weight = %s,"
                        " text_weight = %s, text_hash = %s, image_hash = %s,"
                        " embedded_image_url = %s, status = 'embedded', last_error = NULL,"
                        " error_type = NULL, attempts = attempts + 1, embedded_at = now(),"
                        " updated_at = now() WHERE store_id = %s AND product_id = %s",
                        [
                            (
                                e.text,
                                e.image,
                                e.combined,
                                provenance.text_model,
                                image_model if e.image is not None else None,
                                weights_version,
                                e.weight_category,
                                e.image_weight,
                                e.text_weight,
                                e.text_hash,
                                e.image_hash,
                                e.image_url,
                                store_id,
                                e.product_id,
                            )
                            for e in embedded
                        ],
                    )
                if failed:
                    cursor.executemany(
                        "UPDATE imgembed_products SET status = 'failed', last_error = %s,"
                        " error_type = %s, attempts = attempts + 1, updated_at = now()"
                        " WHERE store_id = %s AND product_id = %s",
                        [(f.error, f.error_type, store_id, f.product_id) for f in failed],
                    )

        # Repeatable (updates by id), so a lost connection is made again and the batch retried;
        # not one whose commit was made (its attempts would be counted twice).
        self._db.run("storing a batch of embeddings", write, transaction=True)

    def bulk_load(
        self,
        store_id: str,
        incoming: int,
        defer_index_min: int,
        waiting: Callable[[str], None] | None = None,
    ) -> bool:
        """Before embedding `incoming` products: a bulk load (at least `defer_index_min`, and
        at least half as many as the store holds embedded) drops the store's HNSW indexes,
        as the item store does: three graphs kept up to date row by row cost ~10 ms a product,
        one build each afterwards a fraction of that. Searches meanwhile scan (exact, slower);
        `refresh` builds them again, also after a run that was stopped. Every store shares the
        products table, so indexes are dropped and built CONCURRENTLY: other stores' imports,
        writes and searches go on meanwhile. `waiting`: see `Connection.alone`."""
        if not defer_index_min or incoming < defer_index_min:
            return False
        with self._cursor("counting embedded products") as cursor:
            cursor.execute(
                "SELECT count(*) FROM imgembed_products WHERE store_id = %s"
                " AND combined_embedding IS NOT NULL",
                (store_id,),
            )
            if 2 * incoming < cursor.fetchone()[0]:
                return False

        def drop(connection: psycopg.Connection[Any]) -> None:
            for part in PARTS:
                index = sql.Identifier(index_name(store_id, part))
                connection.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(index))

        # alone: CONCURRENTLY waits for other sessions' transactions on the table to end
        action = "setting the store's indexes aside for a bulk load"
        self._db.alone(action, drop, INDEX_DDL, waiting)
        log.info("bulk load of %d products into %r: its indexes are built afterwards",
                 incoming, store_id)  # fmt: skip
        return True

    def refresh(
        self,
        store_id: str,
        provenance: StoreProvenance,
        changed: bool = True,
        waiting: Callable[[str], None] | None = None,
    ) -> None:
        """After a run: build the indexes a bulk load set aside, or that a stopped build left
        invalid (with the memory to build in RAM), and refresh the planner's statistics
        (without them it may skip the indexes) when rows `changed` or an index was built.
        `waiting`: see `Connection.alone`."""
        statements = index_ddl(store_id, provenance, concurrently=True)
        names = index_names(store_id, provenance)

        def work(connection: psycopg.Connection[Any]) -> None:
            missing = missing_parts(connection, names)
            if missing:
                rows = connection.execute(
                    "SELECT count(*) FROM imgembed_products WHERE store_id = %s", (store_id,)
                ).fetchone()[0]
                memory = build_memory(rows, provenance.combined_dimension)
                connection.execute(  # for this connection only: it is closed afterwards
                    sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(f"{memory}MB"))
                )
                for part in missing:
                    drop = sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}")
                    connection.execute(drop.format(sql.Identifier(names[part])))
                    connection.execute(statements[part])
            if missing or changed:
                connection.execute("ANALYZE imgembed_products")

        # alone: builds take minutes on a large store; its and other stores' searches go on
        self._db.alone("building the store's indexes", work, INDEX_DDL, waiting)

    def missing_indexes(self, store_id: str, provenance: StoreProvenance) -> list[str]:
        """The parts whose HNSW index is absent or invalid (a bulk run stopped before its
        end): searched exactly until the next run's end builds them."""
        names = index_names(store_id, provenance)
        return self._db.run("reading the store's indexes", lambda c: missing_parts(c, names))

    # -- search and statistics --------------------------------------------------------------

    def search(
        self,
        store_id: str,
        *,
        part: str,
        dimension: int,
        query: np.ndarray,
        image_query: np.ndarray | None,
        text_query: np.ndarray | None,
        top_k: int,
        ef_search: int,
        category_key: str | None = None,
        category: str | None = None,
        max_price: Decimal | None = None,
    ) -> list[dict[str, Any]]:
        """Products nearest by inner product on one part (combined, image or text), with the
        cosine of each part and the fused score computed in full precision, best first."""
        column = f"{part}_embedding"
        conditions = [
            sql.SQL("store_id = {}").format(sql.Literal(store_id)),
            sql.SQL("{} IS NOT NULL").format(sql.Identifier(column)),
        ]
        params: dict[str, Any] = {"q": query, "qi": image_query, "qt": text_query}
        if category is not None:
            conditions.append(
                sql.SQL("(weight_category = %(key)s OR lower(category) = lower(%(category)s))")
            )
            params.update(key=category_key, category=category)
        if max_price is not None:
            conditions.append(sql.SQL("price <= %(max_price)s"))
            params["max_price"] = max_price
        statement = sql.SQL(
            "SELECT product_id, title, category, weight_category, price, currency, image_url,"
            " image_weight, text_weight, -(image_embedding <#> %(qi)s::vector) AS image_score,"
            " -(text_embedding <#> %(qt)s::vector) AS text_score,"
            " -({column} <#> %(q)s::vector) AS score,"
            " image_embedding IS NULL AS text_only"
            " FROM imgembed_products WHERE {where} ORDER BY {ranked} LIMIT {k}"  # a plan per k
        ).format(
            k=sql.Literal(top_k),
            column=sql.Identifier(column),
            where=sql.SQL(" AND ").join(conditions),
            ranked=ranked(column, dimension),
        )
        ef = max(ef_search, 2 * top_k)  # enough candidates for k
        filtered = category is not None or max_price is not None  # store_id: a partial index

        def find(connection: psycopg.Connection[Any]) -> list[dict[str, Any]]:
            self._db.search_settings(connection, ef, filtered=filtered)
            cursor = connection.execute(statement, params, prepare=True)
            names = [c.name for c in cursor.description or []]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

        rows = self._db.run("searching products", find)
        # relaxed order and halfvec ranking: re-sort the k rows by their exact score
        return sorted(rows, key=lambda row: -row["score"])

    def has_vectors(self, store_id: str) -> bool:
        """Whether any product of the store holds a vector (of the recorded models)."""
        with self._cursor("looking for vectors") as cursor:
            cursor.execute(
                "SELECT EXISTS (SELECT 1 FROM imgembed_products WHERE store_id = %s AND"
                " (text_embedding IS NOT NULL OR image_embedding IS NOT NULL"
                " OR combined_embedding IS NOT NULL))",
                (store_id,),
            )
            return bool(cursor.fetchone()[0])

    def embedded_parts(self, store_id: str) -> dict[str, int]:
        """How many of the store's products hold a vector in each part (combined, image,
        text): what a search can rank."""
        counts = sql.SQL(", ").join(
            sql.SQL("count({})").format(sql.Identifier(f"{part}_embedding")) for part in PARTS
        )
        with self._cursor("counting embedded products") as cursor:
            cursor.execute(
                sql.SQL("SELECT {} FROM imgembed_products WHERE store_id = %s").format(counts),
                (store_id,),
            )
            return dict(zip(PARTS, cursor.fetchone(), strict=True))

    def stats(self, store_id: str) -> dict[str, Any]:
        with self._cursor("counting products") as cursor:
            cursor.execute(
                "SELECT count(*) AS total,"
                " count(*) FILTER (WHERE status = 'embedded') AS embedded,"
                " count(*) FILTER (WHERE status = 'failed') AS failed,"
                " count(*) FILTER (WHERE status = 'pending') AS pending,"
                " count(*) FILTER (WHERE combined_embedding IS NOT NULL"
                "   AND image_embedding IS NULL) AS text_only,"
                " count(*) FILTER (WHERE image_url IS NULL) AS without_image_url,"
                " max(embedded_at) AS last_embedded_at"
                " FROM imgembed_products WHERE store_id = %s",
                (store_id,),
            )
            names = [c.name for c in cursor.description or []]
            totals = dict(zip(names, cursor.fetchone(), strict=True))
            cursor.execute(
                # a product whose vectors were forgotten (--force with other models) keeps
                # its old weight_category until it is embedded again
                "SELECT CASE WHEN combined_embedding IS NULL THEN '(not embedded)'"
                " ELSE weight_category END, count(*)"
                " FROM imgembed_products WHERE store_id = %s GROUP BY 1 ORDER BY 1",
                (store_id,),
            )
            totals["categories"] = dict(cursor.fetchall())
            cursor.execute(
                "SELECT error_type, count(*) FROM imgembed_products"
                " WHERE store_id = %s AND status = 'failed' GROUP BY 1 ORDER BY 2 DESC",
                (store_id,),
            )
            totals["errors"] = dict(cursor.fetchall())
        return totals

    def stores(self) -> list[str]:
        with self._cursor("listing stores") as cursor:
            cursor.execute("SELECT DISTINCT store_id FROM imgembed_products ORDER BY 1")
            return [row[0] for row in cursor.fetchall()]


def _array(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    raw = value.to_numpy() if hasattr(value, "to_numpy") else value
    return np.asarray(raw, dtype=np.float32)


def _lock_key(store_id: str) -> str:
    return f"imgembed-catalog:{store_id}"


def _busy(store_id: str) -> StoreBusyError:
    return StoreBusyError(
        f"another `catalog embed` is running for store {store_id!r}; wait for it to finish"
    )
