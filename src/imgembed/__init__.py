"""imgembed: exact CLIP image and text embeddings, cached, batched and searchable."""

from imgembed.config import Settings
from imgembed.engine.pipeline import Progress
from imgembed.errors import (
    CollectionNotFoundError,
    ConfigurationError,
    EncodeError,
    FetchError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImageTooSmallError,
    ImgEmbedError,
    InvalidImageError,
    ModelUnavailableError,
    ProvenanceMismatchError,
    SourceNotAllowedError,
    StoreError,
    UnsupportedFormatError,
)
from imgembed.results import ImageEmbeddingResult, SimilarityResult
from imgembed.service import ImageEmbeddingService

__all__ = [
    "CollectionNotFoundError",
    "ConfigurationError",
    "EncodeError",
    "FetchError",
    "ImageEmbeddingResult",
    "ImageEmbeddingService",
    "ImageError",
    "ImageNotFoundError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "ImgEmbedError",
    "InvalidImageError",
    "ModelUnavailableError",
    "Progress",
    "ProvenanceMismatchError",
    "Settings",
    "SimilarityResult",
    "SourceNotAllowedError",
    "StoreError",
    "UnsupportedFormatError",
]
