"""imgembed: exact CLIP image and text embeddings, cached, batched and searchable."""

from imgembed.config import Settings
from imgembed.engine.pipeline import Progress
from imgembed.errors import (
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
    SourceNotAllowedError,
    UnsupportedFormatError,
)
from imgembed.results import ImageEmbeddingResult, SimilarityResult
from imgembed.service import ImageEmbeddingService

__all__ = [
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
    "Settings",
    "SimilarityResult",
    "SourceNotAllowedError",
    "UnsupportedFormatError",
]
