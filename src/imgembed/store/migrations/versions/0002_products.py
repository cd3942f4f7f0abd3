"""Products per store with text, image and fused embeddings (imgembed.catalog).

Products carry their text, image and combined (fused) embeddings; each store its provenance.
Each vector column has its provenance on the row (text model; image model with pretrained tag
and preprocess fingerprint; the category weights and their table's version), the content
hashes it came from (product text, image bytes), and the outcome of the last embed attempt.
HNSW indexes are partial per store (`WHERE store_id = ...`) on the column cast to the store's
dimension, created with the store's provenance (see imgembed.catalog.repository).

The tables are prefixed like the others, so that a shop's own `products` table in the same
database is never touched.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE imgembed_product_stores (
            store_id text PRIMARY KEY,
            image_model text NOT NULL,
            image_pretrained text NOT NULL,
            image_preprocess text NOT NULL,
            image_dimension integer NOT NULL CHECK (image_dimension > 0),
            text_model text NOT NULL,
            text_dimension integer NOT NULL CHECK (text_dimension > 0),
            weights_version text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE TABLE imgembed_products (
            store_id text NOT NULL,
            product_id text NOT NULL,
            title text NOT NULL,
            description text NOT NULL DEFAULT '',
            category text,
            price numeric CHECK (price >= 0),
            currency text,
            image_url text,
            extra_image_urls text[] NOT NULL DEFAULT '{}',
            attributes jsonb NOT NULL DEFAULT '{}',
            text_embedding vector,
            image_embedding vector,
            combined_embedding vector,
            text_model text,
            image_model text,
            weights_version text,
            weight_category text,
            image_weight double precision,
            text_weight double precision,
            text_hash text,
            image_hash text,
            embedded_image_url text,
            status text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'embedded', 'failed')),
            last_error text,
            error_type text,
            attempts integer NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            embedded_at timestamptz,
            PRIMARY KEY (store_id, product_id)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE imgembed_products")
    op.execute("DROP TABLE imgembed_product_stores")
