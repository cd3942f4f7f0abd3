"""Collections with their provenance; items with vectors, content hashes and JSONB metadata.

One items table holds every collection: each collection gets its own partial HNSW index on
`embedding::vector(dim)` (created with the collection), pgvector's way to mix dimensions.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.execute(
        """
        CREATE TABLE imgembed_collections (
            name text PRIMARY KEY,
            model text NOT NULL,
            pretrained text NOT NULL,
            dimension integer NOT NULL CHECK (dimension > 0),
            preprocess text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
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


def downgrade() -> None:
    op.execute("DROP TABLE imgembed_items")
    op.execute("DROP TABLE imgembed_collections")
