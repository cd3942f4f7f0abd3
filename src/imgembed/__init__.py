"""imgembed: exact CLIP image and text embeddings, cached, batched and searchable."""

from imgembed.config import Settings
from imgembed.engine.pipeline import Progress
from imgembed.errors import (
    ConfigurationError,
    EncodeError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImgEmbedError,
    InvalidImageError,
    ModelUnavailableError,
    UnsupportedFormatError,
)
from imgembed.results import ImageEmbeddingResult, SimilarityResult
from imgembed.service import ImageEmbeddingService

__all__ = [
    "ConfigurationError",
    "EncodeError",
    "ImageEmbeddingResult",
    "ImageEmbeddingService",
    "ImageError",
    "ImageNotFoundError",
    "ImageTooLargeError",
    "ImgEmbedError",
    "InvalidImageError",
    "ModelUnavailableError",
    "Progress",
    "Settings",
    "SimilarityResult",
    "UnsupportedFormatError",
]
