"""Result types returned by the library (the GenericRAG seed's data structures)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imgembed.errors import ImgEmbedError, error_dict

if TYPE_CHECKING:
    import numpy as np


@dataclass
class ImageEmbeddingResult:
    """One input's outcome: an embedding, or the typed error that prevented it."""

    image_path: str  # the source: a path, or "<N bytes>" for raw bytes
    embedding: np.ndarray | None  # float32, shape (dimension,)
    image_id: str | None  # SHA-256 of the image bytes: equal bytes, equal id
    model_name: str
    dimension: int
    normalized: bool
    processing_time: float  # seconds: decode + this item's share of its batch's encode
    metadata: dict[str, Any] = field(default_factory=dict)
    error: ImgEmbedError | None = None
    cached: bool = False
    confidence: float | None = None  # quality signal in [0, 1]; see intake/quality.py

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_path": self.image_path,
            "image_id": self.image_id,
            "embedding": None if self.embedding is None else self.embedding.tolist(),
            "model_name": self.model_name,
            "dimension": self.dimension,
            "normalized": self.normalized,
            "processing_time": self.processing_time,
            "cached": self.cached,
            "confidence": self.confidence,
            "metadata": self.metadata,
            **(error_dict(self.error) if self.error else {"error": None, "error_type": None}),
        }


@dataclass(frozen=True)
class SimilarityResult:
    image_path: str | int  # the candidate's key (a row number for a matrix)
    similarity_score: float
    rank: int  # 1 = most similar
    embedding: list[float] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Duplicates:
    """Groups of near-duplicates in a collection, and the cosine that made them."""

    threshold: float
    groups: list[list[tuple[str, str]]]  # (id, source), largest group first
