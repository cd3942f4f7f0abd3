"""The catalogue's records: what made a store's vectors, and what the bulk job reads and
writes per product."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import numpy as np


@dataclass(frozen=True)
class StoreProvenance:
    """What made a store's vectors: only equal provenance gives comparable vectors."""

    image_model: str
    image_pretrained: str
    image_preprocess: str
    image_dimension: int
    text_model: str
    text_dimension: int

    @property
    def combined_dimension(self) -> int:
        return self.image_dimension + self.text_dimension

    def describe(self) -> str:
        return (
            f"image model {self.image_model} ({self.image_pretrained}, preprocess "
            f"{self.image_preprocess}, {self.image_dimension}-d) and text model "
            f"{self.text_model} ({self.text_dimension}-d)"
        )


@dataclass(frozen=True)
class PlanRow:
    """What the bulk job needs to decide whether a product is up to date (no vectors)."""

    product_id: str
    title: str
    description: str
    category: str | None
    price: Decimal | None
    currency: str | None
    image_url: str | None
    status: str
    text_hash: str | None
    embedded_image_url: str | None
    has_text: bool
    has_image: bool
    has_combined: bool
    weight_category: str | None
    image_weight: float | None
    text_weight: float | None


@dataclass(frozen=True)
class Stored:
    text: np.ndarray | None
    image: np.ndarray | None
    image_hash: str | None


@dataclass(frozen=True)
class EmbeddedProduct:
    product_id: str
    text: np.ndarray
    image: np.ndarray | None
    combined: np.ndarray
    weight_category: str
    image_weight: float
    text_weight: float
    text_hash: str
    image_hash: str | None
    image_url: str | None


@dataclass(frozen=True)
class FailedProduct:
    product_id: str
    error: str
    error_type: str
