"""Result types returned by the library (the GenericRAG seed's data structures)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypedDict

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


class ImageMetadata(TypedDict, total=False):
    """The seed's `ImageMetadata`: what `extract_image_metadata` returns (a dict of these
    keys), and, marked *, what `extract_extended_metadata` adds (null when the file has none).
    """

    width: int  # of the upright image, as shown and embedded
    height: int
    format: str  # "JPEG", "PNG", ...
    mode: str  # "RGB", "RGBA", ...
    size: int | None  # file size in bytes
    dpi: list[int] | None  # [x, y], whole numbers
    animated: bool
    frames: int | None  # None: more than imgembed counts
    has_transparency: bool
    content_hash: str  # SHA-256 of the bytes (= image_id)
    quality: dict[str, Any]  # confidence, contrast, sharpness, size, low_quality
    camera_info: dict[str, Any] | None  # * make, model, lens, software
    exposure: dict[str, Any] | None  # * exposure_time, f_number, iso, focal_length
    creation_date: str | None  # * ISO 8601
    modification_date: str | None  # *
    orientation: int | None  # * EXIF orientation
    gps_info: dict[str, Any] | None  # * latitude, longitude, altitude (decimal)


class EmbeddingList(list):
    """An embedding as the seed's plain `List[float]` (len, slices, JSON, NumPy: a list in
    every way) that also answers the seed's example 2, `embeddings[i]['processing_time']`:
    a string key reads that field of the image's result (`ImageEmbeddingResult.to_dict()`:
    processing_time, image_id, metadata, cached, confidence, ...)."""

    def __init__(self, result: ImageEmbeddingResult):
        assert result.embedding is not None
        super().__init__(result.embedding.tolist())
        self._result = result
        self._fields: dict[str, Any] | None = None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if self._fields is None:  # once, on the first name: the embedding is this list
                without = replace(self._result, embedding=None).to_dict()
                self._fields = {**without, "embedding": list(self)}
            fields = self._fields
            if key not in fields:
                raise KeyError(
                    f"{key!r}: an embedding is a list of floats; by name it gives its "
                    f"result's fields ({', '.join(fields)})"
                )
            return fields[key]
        return super().__getitem__(key)

    def __reduce__(self) -> tuple:  # pickled (e.g. to a process pool) as the plain list
        return (list, (list(self),))


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
