"""The stores' HNSW indexes on the products table: one partial index per store and part, on
the column cast to the store's dimension, in half precision where pgvector can index it."""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg
from psycopg import sql

from imgembed.catalog.records import StoreProvenance

HALFVEC_LIMIT = 4000  # pgvector's HNSW limit for `halfvec`
PARTS = ("combined", "image", "text")
# Builds and drops of the stores' indexes, one at a time in every process: all stores share
# the products table, and two CONCURRENTLY statements on it wait for each other (deadlock).
INDEX_DDL = "imgembed_products: index builds and drops"


def index_type(dimension: int) -> str | None:
    """Half precision: half the graph; at 20k products built in 16.2 against 25.6 s, combined
    search p50 2.50 against 3.11 ms at the same recall (bench_catalog_store.py; migration
    0004)."""
    return "halfvec" if dimension <= HALFVEC_LIMIT else None


def index_name(store_id: str, part: str) -> str:
    return f"imgembed_products_{part}_" + hashlib.sha256(store_id.encode()).hexdigest()[:16]


def ranked(column: str, dimension: int) -> sql.Composable:
    """`column <#> query` in the form the store's index was built on."""
    kind = index_type(dimension)
    if kind is None:
        return sql.SQL("{} <#> %(q)s::vector").format(sql.Identifier(column))
    return sql.SQL("({col}::{kind}({dim})) <#> (%(q)s::vector({dim}))::{kind}({dim})").format(
        col=sql.Identifier(column), kind=sql.SQL(kind), dim=sql.Literal(dimension)
    )


def index_ddl(
    store_id: str, provenance: StoreProvenance, concurrently: bool = False
) -> dict[str, sql.Composed]:
    """The store's HNSW index per part (a part wider than pgvector indexes has none: it is
    searched exactly). Partial, on the column cast to the store's dimension."""
    dimensions = {
        "combined": provenance.combined_dimension,
        "image": provenance.image_dimension,
        "text": provenance.text_dimension,
    }
    statements = {}
    for part in PARTS:
        kind = index_type(dimensions[part])
        if kind is None:
            continue
        statements[part] = sql.SQL(
            "CREATE INDEX {concurrently} IF NOT EXISTS {index} ON imgembed_products USING hnsw"
            " (({column}::{kind}({dim})) {ops}) WHERE store_id = {store}"
        ).format(
            concurrently=sql.SQL("CONCURRENTLY" if concurrently else ""),
            index=sql.Identifier(index_name(store_id, part)),
            column=sql.Identifier(f"{part}_embedding"),
            kind=sql.SQL(kind),
            dim=sql.Literal(dimensions[part]),
            ops=sql.SQL(f"{kind}_ip_ops"),
            store=sql.Literal(store_id),
        )
    return statements


def index_names(store_id: str, provenance: StoreProvenance) -> dict[str, str]:
    return {part: index_name(store_id, part) for part in index_ddl(store_id, provenance)}


def missing_parts(connection: psycopg.Connection[Any], names: dict[str, str]) -> list[str]:
    """The parts (of `names`: part -> index name) without a valid index."""
    valid = {
        row[0]
        for row in connection.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relname = ANY(%s) AND i.indisvalid",
            (list(names.values()),),
        )
    }
    return [part for part, name in names.items() if name not in valid]
