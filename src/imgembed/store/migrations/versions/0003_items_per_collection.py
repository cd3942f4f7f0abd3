"""Each collection gets a table of its own, its vectors in a `vector(dimension)` column.

Before, one table held every collection, each with a partial HNSW index over
`embedding::vector(dim)`: vectors of 512 dimensions (just over 2 KB) went to TOAST (an index
lookup more per row read), and a bulk load could not set one collection's index aside.
Now: a table per collection (vectors kept in the row, not in TOAST), its HNSW index over the
vectors in half precision, a GIN index on the metadata. Existing items move over; the
registry names each collection's table.

The DDL is written out here, as it stood at this revision (the store's own may change later,
in a migration of its own).

Revision ID: 0003
Revises: 0002
"""

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

HNSW_MAX_DIMENSION = 4000


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def _collections() -> list[tuple[str, int]]:
    rows = op.get_bind().execute(sa.text("SELECT name, dimension FROM imgembed_collections"))
    return [(name, dimension) for name, dimension in rows]


def upgrade() -> None:
    op.execute("ALTER TABLE imgembed_collections ADD COLUMN items_table text UNIQUE")
    for name, dimension in _collections():
        table = f"imgembed_items_{_digest(name)}"
        op.execute(
            f'CREATE TABLE "{table}" (id text PRIMARY KEY, embedding vector({dimension}) NOT NULL,'
            " content_hash text NOT NULL, source text NOT NULL, metadata jsonb NOT NULL DEFAULT"
            " '{}', updated_at timestamptz NOT NULL DEFAULT now())"
            " WITH (toast_tuple_target = 8160)"
        )
        op.execute(f'ALTER TABLE "{table}" ALTER COLUMN embedding SET STORAGE EXTERNAL')
        op.get_bind().execute(
            sa.text(
                f'INSERT INTO "{table}" SELECT id, embedding::vector({dimension}), content_hash,'
                " source, metadata, updated_at FROM imgembed_items WHERE collection = :name"
            ),
            {"name": name},
        )
        op.execute(
            f'CREATE INDEX "{table}_metadata" ON "{table}" USING gin (metadata jsonb_path_ops)'
        )
        if dimension <= HNSW_MAX_DIMENSION:
            op.execute(
                f'CREATE INDEX "{table}_hnsw" ON "{table}" USING hnsw'
                f" ((embedding::halfvec({dimension})) halfvec_cosine_ops)"
            )
        op.get_bind().execute(
            sa.text("UPDATE imgembed_collections SET items_table = :table WHERE name = :name"),
            {"table": table, "name": name},
        )
    op.execute("ALTER TABLE imgembed_collections ALTER COLUMN items_table SET NOT NULL")
    op.execute("DROP TABLE imgembed_items")  # its partial indexes go with it


def downgrade() -> None:
    op.execute(
        """
        CREATE TABLE imgembed_items (
            collection text NOT NULL REFERENCES imgembed_collections (name) ON DELETE CASCADE,
            id text NOT NULL,
            embedding vector NOT NULL,
            content_hash text NOT NULL,
            source text NOT NULL,
            metadata jsonb NOT NULL DEFAULT '{}',
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (collection, id)
        )
        """
    )
    op.execute(
        "CREATE INDEX imgembed_items_metadata ON imgembed_items USING gin (metadata jsonb_path_ops)"
    )
    op.execute("CREATE INDEX imgembed_items_hash ON imgembed_items (collection, content_hash)")
    bind = op.get_bind()
    for name, dimension in _collections():
        table = bind.execute(
            sa.text("SELECT items_table FROM imgembed_collections WHERE name = :name"),
            {"name": name},
        ).scalar_one()
        bind.execute(
            sa.text(
                "INSERT INTO imgembed_items SELECT :name, id, embedding, content_hash, source,"
                f' metadata, updated_at FROM "{table}"'
            ),
            {"name": name},
        )
        literal = bind.execute(sa.text("SELECT quote_literal(:name)"), {"name": name}).scalar_one()
        op.execute(
            f'CREATE INDEX "imgembed_hnsw_{_digest(name)}" ON imgembed_items USING hnsw'
            f" ((embedding::vector({dimension})) vector_cosine_ops) WHERE collection = {literal}"
        )
        op.execute(f'DROP TABLE "{table}"')
    op.execute("ALTER TABLE imgembed_collections DROP COLUMN items_table")
