"""imgembed: exact CLIP image and text embeddings, cached, batched and searchable.

The service, its settings and result types are imported on first use: a command that only
asks the resident search process (`imgembed search` after `imgembed db start`) does not pay
for NumPy, Pillow, the model runtimes and the database driver."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from imgembed.errors import (
    CategoryWeightsError,
    CollectionNotFoundError,
    ConfigurationError,
    DataDirError,
    EncodeError,
    FetchError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImageTooSmallError,
    ImgEmbedError,
    InvalidImageError,
    InvalidRecordError,
    InvalidSourceError,
    ModelUnavailableError,
    OutputError,
    OverloadedError,
    ProductNotFoundError,
    ProvenanceMismatchError,
    RequestTimeoutError,
    RequestTooLargeError,
    SourceListError,
    SourceNotAllowedError,
    StoreBusyError,
    StoreDamagedError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
    TextApiSettingError,
    TextEmbeddingError,
    UnavailableError,
    UnknownModelError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:
    from imgembed.config import Settings
    from imgembed.engine.pipeline import Progress
    from imgembed.results import ImageEmbeddingResult, ImageMetadata, SimilarityResult
    from imgembed.service import ImageEmbeddingService

_LAZY = {
    "ImageEmbeddingResult": "imgembed.results",
    "ImageEmbeddingService": "imgembed.service",
    "ImageMetadata": "imgembed.results",
    "Progress": "imgembed.engine.pipeline",
    "Settings": "imgembed.config",
    "SimilarityResult": "imgembed.results",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'imgembed' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once
    return value


__all__ = [
    "CategoryWeightsError",
    "CollectionNotFoundError",
    "ConfigurationError",
    "DataDirError",
    "EncodeError",
    "FetchError",
    "ImageEmbeddingResult",
    "ImageEmbeddingService",
    "ImageError",
    "ImageMetadata",
    "ImageNotFoundError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "ImgEmbedError",
    "InvalidImageError",
    "InvalidRecordError",
    "InvalidSourceError",
    "ModelUnavailableError",
    "OutputError",
    "OverloadedError",
    "ProductNotFoundError",
    "Progress",
    "ProvenanceMismatchError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "Settings",
    "SimilarityResult",
    "SourceListError",
    "SourceNotAllowedError",
    "StoreBusyError",
    "StoreDamagedError",
    "StoreError",
    "StoreFullError",
    "StoreUnavailableError",
    "TextApiSettingError",
    "TextEmbeddingError",
    "UnavailableError",
    "UnknownModelError",
    "UnsupportedFormatError",
]
