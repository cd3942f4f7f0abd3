"""Local sources into bytes, within limits: paths (optionally confined to allowed roots),
raw bytes and base64 data URIs. URLs are fetched by `fetch.py`."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from imgembed.errors import (
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidImageError,
    SourceNotAllowedError,
)

Source = str | os.PathLike[str] | bytes


def is_url(source: object) -> bool:
    return isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))


def is_data_uri(source: object) -> bool:
    return isinstance(source, str) and source[:5].lower() == "data:"


def describe(source: Source | Image.Image) -> str:
    """A short label for messages and results."""
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height} {source.mode}>"
    if is_data_uri(source):
        return f"<data URI, {len(source)} characters>"
    return os.fspath(source)


def check_size(data: bytes, max_file_size: int, label: str) -> bytes:
    if len(data) > max_file_size:
        raise ImageTooLargeError(_too_large(len(data), max_file_size), label)
    return data


def _too_large(size: int, limit: int) -> str:
    return f"{size:,} bytes, over the limit of {limit:,} (max_file_size)"


def decode_base64(text: str, max_file_size: int, label: str = "<base64>") -> bytes:
    """Bytes from a data URI (`data:image/png;base64,...`) or plain base64 text."""
    if is_data_uri(text):
        header, _, text = text.partition(",")
        if not header.lower().endswith(";base64"):
            raise InvalidImageError("only base64 data URIs are supported", label)
    # Refuse by the encoded length before allocating the decoded bytes.
    if len(text) * 3 // 4 > max_file_size + 3:
        raise ImageTooLargeError(_too_large(len(text) * 3 // 4, max_file_size), label)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"invalid base64: {exc}", label) from exc
    return check_size(data, max_file_size, label)


def check_allowed(path: Path, roots: list[Path] | None) -> Path:
    """The real path, if it lies inside one of the roots (symlinks and `..` resolved)."""
    if roots is None:
        return path
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in roots):
        raise SourceNotAllowedError(
            f"outside the allowed roots ({', '.join(map(str, roots))})", str(path)
        )
    return real


def read_file(path: Path, max_file_size: int, roots: list[Path] | None = None) -> bytes:
    label = str(path)
    try:
        real = check_allowed(path, roots)
        if not real.is_file():
            if real.exists():
                raise ImageNotFoundError("not a file", label)
            raise ImageNotFoundError("no such file", label)
        with real.open("rb") as handle:
            # Read one byte past the limit instead of trusting stat (files can grow).
            data = handle.read(max_file_size + 1)
        return check_size(data, max_file_size, label)
    except PermissionError as exc:
        raise ImageNotFoundError("permission denied", label) from exc
    except RuntimeError as exc:  # Path.resolve on a symlink loop
        raise ImageNotFoundError(f"cannot resolve: {exc}", label) from exc
    except OSError as exc:  # loops, names too long, I/O errors
        raise ImageNotFoundError(f"cannot read: {exc.strerror or exc}", label) from exc


def expand_paths(
    paths: Iterable[str | os.PathLike[str]],
    extensions: Iterable[str],
    failures: list[ImageError] | None = None,
) -> list[Path | str]:
    """Files as given, URLs and data URIs untouched; folders walked recursively (sorted;
    symlinked folders are not followed, so link loops cannot recur) for files with one of
    the extensions. A folder that cannot be listed (permissions, I/O errors) does not stop
    the walk: it goes to `failures` as an ImageNotFoundError if a list is given, otherwise
    it stays in the result, so that reading it fails as that entry's typed error."""
    wanted = {ext.lower() for ext in extensions}
    found: list[Path | str] = []

    def unreadable(exc: OSError) -> None:
        folder = Path(exc.filename) if exc.filename else Path(exc.args[-1])
        if failures is None:
            found.append(folder)
        else:
            reason = exc.strerror or str(exc)
            failures.append(ImageNotFoundError(f"cannot list folder: {reason}", str(folder)))

    for entry in paths:
        if is_url(entry) or is_data_uri(entry):
            found.append(str(entry))
            continue
        path = Path(entry)
        if not path.is_dir():
            found.append(path)
            continue
        for root, dirs, files in os.walk(path, onerror=unreadable):
            dirs.sort()
            found.extend(
                Path(root, name) for name in sorted(files) if Path(name).suffix.lower() in wanted
            )
    return found
