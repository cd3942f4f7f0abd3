"""The product catalogue (the Findly document): products per store, text + image embeddings
fused by category, bulk embedding, product search.

    from imgembed.catalog import Catalog, generate_embedding

    with Catalog() as catalog:                       # settings from IMGEMBED_* variables
        catalog.import_file("products.json", "demo_store")
        catalog.embed("demo_store")
        hits = catalog.search("demo_store", "rode jurk", max_price=50)

The module-level functions keep the Findly document's names and signatures; they use one
Catalog per process built from the environment on first use (like the document's cached
model). See imgembed.catalog.fusion for the fusion formula, .weights for the category table,
.jobs for the bulk embed, .search for how queries rank."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from decimal import Decimal

from imgembed.catalog.catalog import Catalog, ImportReport, StoreStats
from imgembed.catalog.importer import BadRow
from imgembed.catalog.jobs import EmbedEvents, EmbedStats
from imgembed.catalog.products import ProductInput, product_text
from imgembed.catalog.records import StoreProvenance
from imgembed.catalog.search import ProductHit
from imgembed.catalog.text_vectors import TextEmbedder
from imgembed.catalog.weights import Weights, WeightsTable, findly_table, load_weights


@functools.cache
def default_catalog() -> Catalog:
    """The process's Catalog for the module-level functions, from IMGEMBED_* variables."""
    return Catalog()


def generate_image_embedding(image_url: str) -> list[float]:
    """The image's unit embedding (see Catalog.generate_image_embedding)."""
    return default_catalog().generate_image_embedding(image_url)


def generate_text_embedding(text: str) -> list[float]:
    """The text's unit embedding from the catalogue's text model: the `text_emb` that
    combine_embeddings takes (see Catalog.generate_text_embedding)."""
    return default_catalog().generate_text_embedding(text)


def generate_embedding(
    title: str,
    description: str | None = None,
    category: str | None = None,
    price: float | Decimal | None = None,
    image_url: str | None = None,
) -> list[float]:
    """The product's combined vector (see Catalog.generate_embedding)."""
    return default_catalog().generate_embedding(
        title=title, description=description, category=category, price=price, image_url=image_url
    )


def combine_embeddings(
    text_emb: Sequence[float], image_emb: Sequence[float] | None, category: str | None = None
) -> list[float]:
    """`[w_img * img ; w_txt * txt]` (see Catalog.combine_embeddings)."""
    return default_catalog().combine_embeddings(text_emb, image_emb, category)


__all__ = [
    "BadRow",
    "Catalog",
    "EmbedEvents",
    "EmbedStats",
    "ImportReport",
    "ProductHit",
    "ProductInput",
    "StoreProvenance",
    "StoreStats",
    "TextEmbedder",
    "Weights",
    "WeightsTable",
    "combine_embeddings",
    "default_catalog",
    "findly_table",
    "generate_embedding",
    "generate_image_embedding",
    "generate_text_embedding",
    "load_weights",
    "product_text",
]
