"""One exception tree for everything imgembed raises on purpose.

    ImgEmbedError
    ├── ConfigurationError        settings that cannot work (dimension mismatch, no CUDA, ...)
    ├── ModelUnavailableError     weights or architecture cannot be had
    ├── ImageError                one input image is unusable (carries its `source`)
    │   ├── ImageNotFoundError
    │   ├── InvalidImageError     corrupt or truncated data, not an image
    │   ├── UnsupportedFormatError
    │   ├── ImageTooLargeError    file size, pixel count or side over the limit
    │   ├── ImageTooSmallError
    │   ├── SourceNotAllowedError outside the allowed roots, or a private address
    │   └── FetchError            a URL could not be downloaded
    ├── EncodeError               the model failed on a batch
    │   └── TextEmbeddingError    a text embedder (an API, Ollama) failed or changed dimension
    └── StoreError                the vector database failed or refused
        ├── CollectionNotFoundError
        └── ProvenanceMismatchError  a collection built with another model

Surfaces map these to HTTP status codes and CLI exit codes in one place each.
"""

from __future__ import annotations


class ImgEmbedError(Exception):
    """Base of every error imgembed raises on purpose."""


class ConfigurationError(ImgEmbedError):
    """The settings cannot work together or with this machine."""


class ModelUnavailableError(ImgEmbedError):
    """The model's weights or architecture cannot be loaded."""


class ImageError(ImgEmbedError):
    """One input image cannot be embedded; `source` says which."""

    def __init__(self, message: str, source: str | None = None):
        super().__init__(message)
        self.source = source

    def __str__(self) -> str:
        text = super().__str__()
        return f"{self.source}: {text}" if self.source else text


class ImageNotFoundError(ImageError):
    """The path does not exist or is not a file."""


class InvalidImageError(ImageError):
    """The data is not a readable image (corrupt, truncated, empty)."""


class UnsupportedFormatError(ImageError):
    """The data is an image in a format imgembed does not accept."""


class ImageTooLargeError(ImageError):
    """The file or the pixel count exceeds the configured limit."""


class ImageTooSmallError(ImageError):
    """The image's shorter side is under the configured minimum."""


class SourceNotAllowedError(ImageError):
    """A path outside the allowed roots, or a URL that resolves to a private address."""


class FetchError(ImageError):
    """A URL could not be downloaded (status, timeout, content type, connection)."""

    def __init__(self, message: str, source: str | None = None, status: int | None = None):
        super().__init__(message, source)
        self.status = status


class EncodeError(ImgEmbedError):
    """The model failed while encoding a batch."""


class TextEmbeddingError(EncodeError):
    """A text embedder failed: an API after its retries, a malformed answer, or vectors of
    another dimension than before. `status` is the HTTP status, if there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class StoreError(ImgEmbedError):
    """The vector store failed (connection, migration, query) or refused an operation."""


class CollectionNotFoundError(StoreError):
    """No collection of that name."""


class ProvenanceMismatchError(StoreError):
    """The collection was built with another model or preprocessing than asked for."""


__all__ = [
    "CollectionNotFoundError",
    "ConfigurationError",
    "EncodeError",
    "FetchError",
    "ImageError",
    "ImageNotFoundError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "ImgEmbedError",
    "InvalidImageError",
    "ModelUnavailableError",
    "ProvenanceMismatchError",
    "SourceNotAllowedError",
    "StoreError",
    "TextEmbeddingError",
    "UnsupportedFormatError",
]
