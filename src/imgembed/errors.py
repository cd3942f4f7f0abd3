"""One exception tree for everything imgembed raises on purpose.

    ImgEmbedError
    ├── ConfigurationError        settings that cannot work (dimension mismatch, no CUDA, ...)
    │   └── CategoryWeightsError  the category weights file cannot be read or used
    ├── ModelUnavailableError     weights or architecture cannot be had
    ├── ImageError                one input image is unusable (carries its `source`)
    │   ├── ImageNotFoundError
    │   ├── InvalidImageError     corrupt or truncated data, not an image
    │   ├── UnsupportedFormatError
    │   ├── ImageTooLargeError    file size, pixel count or side over the limit
    │   ├── ImageTooSmallError
    │   ├── SourceNotAllowedError outside the allowed roots, a private address, a model not offered
    │   ├── FetchError            a URL could not be downloaded
    │   └── SourceListError       a list file or one of its rows names no usable image
    ├── EncodeError               the model failed on a batch
    │   └── TextEmbeddingError    a text embedder (an API, Ollama) failed or changed dimension
    │       └── TextApiSettingError   its URL or API key cannot work (also a ConfigurationError)
    ├── OutputError               an output file could not be written (disk full, ...)
    ├── StoreError                the vector database failed or refused
    │   ├── CollectionNotFoundError
    │   ├── ProvenanceMismatchError  a collection built with another model
    │   ├── StoreUnavailableError    the database cannot be reached or went away
    │   │   └── StoreDamagedError    its files are damaged: to restore, not to retry
    │   ├── StoreFullError           the disk under the store is full
    │   └── InvalidRecordError       a vector, id or metadata the store cannot hold
    ├── RequestTooLargeError      a request over a service limit (body bytes, inputs)
    └── UnavailableError          the service cannot take work now (loading, stopping)
        └── OverloadedError       its queue is full; both carry `retry_after` (seconds)

Surfaces map these to HTTP status codes and CLI exit codes in one place each, and turn
them into data with `error_dict`.
"""

from __future__ import annotations

from typing import Any

from imgembed.names import printable


class ImgEmbedError(Exception):
    """Base of every error imgembed raises on purpose."""


class ConfigurationError(ImgEmbedError):
    """The settings cannot work together or with this machine."""


class ModelUnavailableError(ImgEmbedError):
    """The model's weights or architecture cannot be loaded."""


class UnknownModelError(ModelUnavailableError):
    """No such model architecture: a wrong name, not weights that could not be had."""


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
    """A path outside the allowed roots, a URL that resolves to a private address, or a
    model a server does not offer its clients."""


class InvalidSourceError(ImageError):
    """The input names no image that could be read: a malformed URL (no host, a port out of
    range). Unlike FetchError, the request is at fault, not the remote server."""


class FetchError(ImageError):
    """A URL could not be downloaded (status, timeout, content type, connection)."""

    def __init__(self, message: str, source: str | None = None, status: int | None = None):
        super().__init__(message, source)
        self.status = status


class SourceListError(ImageError):
    """A list file (.csv/.jsonl/.txt) or one of its rows cannot be used: a row without an
    image column, a line that is not JSON, a file that is not UTF-8. `source` names the
    file and line (`products.csv:12`)."""


class EncodeError(ImgEmbedError):
    """The model failed while encoding a batch."""


class OutputError(ImgEmbedError):
    """An output file could not be written after the work was done (disk full, its folder
    removed meanwhile); the message names the file and the reason."""


class CategoryWeightsError(ConfigurationError):
    """The category weights file (IMGEMBED_CATEGORY_WEIGHTS) cannot be read or used: the
    operator's setting to fix (the CLI says so, exit 3), while to an HTTP client the server
    cannot serve its catalogue (503), not its request."""


class TextEmbeddingError(EncodeError):
    """A text embedder failed: an API after its retries, a malformed answer, or vectors of
    another dimension than before. `status` is the HTTP status, if there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class TextApiSettingError(ConfigurationError, TextEmbeddingError):
    """The text API's own settings cannot work (its URL, a key it refuses): the operator's
    to fix (the CLI says so, exit 3), while to an HTTP client the embedder behind the server
    failed (502), not its request."""


class StoreError(ImgEmbedError):
    """The vector store failed (connection, migration, query) or refused an operation."""


class CollectionNotFoundError(StoreError):
    """No collection of that name."""


class ProductNotFoundError(StoreError):
    """No product with that id in the store."""


class ProvenanceMismatchError(StoreError):
    """The collection was built with another model or preprocessing than asked for."""


class StoreBusyError(StoreError):
    """Another bulk job (another process or server) is embedding the store, or indexing
    into the collection, right now."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached, or went away during a call (server stopped or
    killed, connection lost); a retry after reconnecting also failed."""


class StoreDamagedError(StoreUnavailableError):
    """Files the store needs are damaged and could not be set aside: someone must restore or
    move them (the message says which); retrying will not help."""


class DataDirError(ConfigurationError, StoreUnavailableError):
    """The data directory cannot be made or written: the operator's setting to fix (the CLI
    says so, exit 3), while to an HTTP client the store is unavailable (503), not its request."""


class StoreFullError(StoreError):
    """The disk under the store is full; nothing of the failed call was stored."""


class InvalidRecordError(StoreError):
    """A vector, id or metadata the store cannot hold: wrong dimension, NaN or infinity,
    text that is not valid UTF-8 or contains NUL characters."""


class RequestTooLargeError(ImgEmbedError):
    """A request over one of the service's limits (body size, inputs per request)."""


class RequestTimeoutError(ImgEmbedError):
    """A request whose body stopped arriving (HTTP 408)."""


class UnavailableError(ImgEmbedError):
    """The service cannot take this work now (model loading, shutting down): retry later."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class OverloadedError(UnavailableError):
    """More work is waiting than the service accepts (a bounded queue, not unbounded memory)."""


def error_dict(error: BaseException) -> dict[str, Any]:
    """An error as data, the same on every surface: the message and the error's type. The
    message is valid UTF-8: it may quote a lone surrogate (a JSON "\\ud800" escape, a file
    name's undecodable byte), which no JSON body or log line can hold as it is."""
    return {"error": printable(str(error)), "error_type": type(error).__name__}


__all__ = [
    "CategoryWeightsError",
    "CollectionNotFoundError",
    "ConfigurationError",
    "DataDirError",
    "EncodeError",
    "FetchError",
    "ImageError",
    "ImageNotFoundError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "ImgEmbedError",
    "InvalidImageError",
    "InvalidRecordError",
    "ModelUnavailableError",
    "OutputError",
    "OverloadedError",
    "ProvenanceMismatchError",
    "RequestTooLargeError",
    "SourceListError",
    "SourceNotAllowedError",
    "StoreError",
    "StoreFullError",
    "StoreUnavailableError",
    "TextApiSettingError",
    "TextEmbeddingError",
    "UnavailableError",
    "UnsupportedFormatError",
    "error_dict",
]
