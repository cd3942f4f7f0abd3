"""Reading image sources (paths, folders, raw bytes) into bytes, within limits."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from imgembed.errors import ImageNotFoundError, ImageTooLargeError

Source = str | os.PathLike[str] | bytes

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".mpo"}
)


def describe(source: Source | Image.Image) -> str:
    """A short label for messages and results."""
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height} {source.mode}>"
    return os.fspath(source)


def read_bytes(source: Source, max_file_size: int) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if len(data) > max_file_size:
            raise ImageTooLargeError(_too_large(len(data), max_file_size), describe(source))
        return data
    path = Path(source)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ImageNotFoundError("not a file", str(path))
        if size > max_file_size:
            raise ImageTooLargeError(_too_large(size, max_file_size), str(path))
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ImageNotFoundError("no such file", str(path)) from exc
    except PermissionError as exc:
        raise ImageNotFoundError("permission denied", str(path)) from exc


def _too_large(size: int, limit: int) -> str:
    return f"file is {size:,} bytes, over the limit of {limit:,} (max_file_size)"


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; folders walked recursively (sorted, symlinked folders not followed,
    so link loops cannot recur) for files with an image extension."""
    found: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if not path.is_dir():
            found.append(path)
            continue
        for root, dirs, files in os.walk(path):
            dirs.sort()
            found.extend(
                Path(root, name)
                for name in sorted(files)
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS
            )
    return found
