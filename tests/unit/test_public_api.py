"""The public surface is small and explicit; the library never imports a surface."""

import subprocess
import sys

import imgembed

PUBLIC = {
    "UnavailableError",
    "StoreUnavailableError",
    "StoreFullError",
    "StoreBusyError",
    "StoreDamagedError",
    "TextApiSettingError",
    "TextEmbeddingError",
    "SourceListError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "OverloadedError",
    "OutputError",
    "InvalidRecordError",
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
    "InvalidSourceError",
    "ModelUnavailableError",
    "ProductNotFoundError",
    "Progress",
    "ProvenanceMismatchError",
    "Settings",
    "SimilarityResult",
    "SourceNotAllowedError",
    "UnknownModelError",
    "StoreError",
    "UnsupportedFormatError",
}


def test_all_is_exactly_the_public_surface():
    assert set(imgembed.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(imgembed, name) is not None


def test_every_error_is_an_imgembed_error():
    for name in PUBLIC:
        obj = getattr(imgembed, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, imgembed.ImgEmbedError), name


def test_library_does_not_import_the_cli():
    code = (
        "import sys, imgembed; "
        "from imgembed.service import ImageEmbeddingService; "
        "print(sorted(m for m in ('typer', 'imgembed.cli', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
