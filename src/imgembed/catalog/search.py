"""Product search: which parts a query has, and which column ranks it.

A query with both parts (a text with a CLIP image model: [clip_text(q) ; txt(q)]; or an image
and a text: [img(q) ; txt(q)]) ranks by the combined column, so each product scores
`w_img * cos_img + w_txt * cos_txt` with its own category's weights. A query with one part
only (an image alone; a text when the image model has no text tower) ranks by that part's
own cosine on its own column: the fused vector would weigh that single part by each
product's category and so skew the ranking between categories."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

import numpy as np

from imgembed.catalog import fusion
from imgembed.catalog.records import StoreProvenance
from imgembed.catalog.text_vectors import TextEmbedder
from imgembed.errors import ConfigurationError
from imgembed.intake.image_input import Input
from imgembed.models import registry


@dataclass(frozen=True)
class Query:
    part: str  # the column that ranks: combined | image | text
    vector: np.ndarray
    image: np.ndarray | None
    text: np.ndarray | None

    def dimension(self, provenance: StoreProvenance) -> int:
        return {
            "combined": provenance.combined_dimension,
            "image": provenance.image_dimension,
            "text": provenance.text_dimension,
        }[self.part]


def build_query(
    service: Any, text_embedder: TextEmbedder | None, text: str | None, image: Input | None
) -> Query:
    """The query's parts (`text`: None or not blank); `text_embedder` is needed only for a
    text."""
    if text is None and image is None:
        raise ConfigurationError("search needs a text, an image, or both")
    text_part = None
    if text is not None:
        assert text_embedder is not None
        text_part = text_embedder.embed([text])[0]
    if image is not None:
        image_part = service.embed_image(image)
    elif registry.facts(service.model_ref.name).has_text_tower:
        image_part = service.embed_text(text)
    else:
        image_part = None
    # unit parts: each part's score is a cosine also when the service does not normalise
    # (IMGEMBED_NORMALIZE=false), as the stored parts are unit too
    if image_part is not None:
        image_part = fusion.unit(image_part, "query image part")
    if text_part is not None:
        text_part = fusion.unit(text_part, "query text part")
    if image_part is not None and text_part is not None:
        return Query("combined", fusion.query(image_part, text_part), image_part, text_part)
    if image_part is not None:
        return Query("image", image_part, image_part, None)
    assert text_part is not None
    return Query("text", text_part, None, text_part)


@dataclass(frozen=True)
class ProductHit:
    rank: int
    product_id: str
    score: float  # what ranked it: the fused score, or one part's cosine
    ranked_by: str  # combined | image | text
    image_score: float | None  # cosine of the image parts (None: no image, or not asked)
    text_score: float | None  # cosine of the text parts (None: not asked)
    image_weight: float | None  # the product's own category weights
    text_weight: float | None
    title: str
    category: str | None
    weight_category: str | None
    price: float | None
    currency: str | None
    image_url: str | None
    text_only: bool  # embedded without an image: its image part is zero

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hits(rows: list[dict[str, Any]], query: Query) -> list[ProductHit]:
    return [
        ProductHit(
            rank=rank,
            product_id=row["product_id"],
            score=float(row["score"]),
            ranked_by=query.part,
            image_score=_float(row["image_score"]),
            text_score=_float(row["text_score"]),
            image_weight=row["image_weight"],
            text_weight=row["text_weight"],
            title=row["title"],
            category=row["category"],
            weight_category=row["weight_category"],
            price=_float(row["price"]),
            currency=row["currency"],
            image_url=row["image_url"],
            text_only=row["text_only"],
        )
        for rank, row in enumerate(rows, start=1)
    ]


def _float(value: float | Decimal | None) -> float | None:
    return None if value is None else float(value)
