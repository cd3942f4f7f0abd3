"""Local sources into bytes, within limits: paths (optionally confined to allowed roots),
raw bytes and base64 data URIs. URLs are fetched by `fetch.py`."""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from imgembed.errors import (
    ConfigurationError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidImageError,
    SourceNotAllowedError,
)
from imgembed.names import printable, restore

Source = str | os.PathLike[str] | bytes
READ_CHUNK = 1 << 20
# Non-blocking: opening a FIFO must not wait for a writer (flags missing on Windows are 0).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
_OPEN_FLAGS |= getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


def is_url(source: object) -> bool:
    return isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))


def url_scheme(source: object) -> str | None:
    """The scheme of a name written as a URL (`ftp`, `s3`, `file`, also http(s))."""
    found = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://", source) if isinstance(source, str) else None
    return found[1] if found else None


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
    if not isinstance(source, str | os.PathLike):  # e.g. None from a list with gaps
        return f"<{type(source).__name__}>"
    return os.fspath(source)


def checked_sources(sources: Iterable[object]) -> list:
    """The inputs of a batch as a list; one image given where a list is asked for is refused
    (a string would be embedded character by character)."""
    if isinstance(sources, str | bytes | bytearray | memoryview | os.PathLike | Image.Image):
        raise ConfigurationError(
            f"a list of images is needed, not one {type(sources).__name__} "
            "(for one image: embed_image / generate_embedding_from_image_path)"
        )
    if not isinstance(sources, Iterable):  # None, a number: no list at all
        raise ConfigurationError(f"a list of images is needed, not {type(sources).__name__}")
    return list(sources)


def as_path(source: str | os.PathLike[str]) -> Path:
    """A path from a name; an empty name is refused (Path("") would be the current folder),
    and so is a URL of another scheme than http(s) (Path would read ftp://x as ftp:/x). A
    name as we print it (`caf\\xe9.jpg`, not UTF-8) opens the file it stands for."""
    if isinstance(source, str) and not source.strip():
        raise ImageNotFoundError("empty path: give a file, a URL or image data", repr(source))
    scheme = url_scheme(source)
    if scheme and scheme.lower() in ("http", "https"):  # "https:// is not fetched" said before
        raise SourceNotAllowedError("a URL where a local path is asked for", source[:200])
    if scheme:
        raise SourceNotAllowedError(
            f"{scheme}:// is not fetched: only http(s) URLs are", source[:200]
        )
    name = os.fspath(source)
    if isinstance(name, str) and "\\x" in name and not os.path.lexists(name):
        # a name we printed as `\xNN` (not UTF-8) opens the file it came from
        restored = restore(name)
        if os.path.lexists(restored):
            return Path(restored)
    return Path(source)


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
        raise ImageTooLargeError(
            f"about {len(text) * 3 // 4:,} bytes, over the limit of {max_file_size:,} "
            "(max_file_size)",
            label,
        )
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"invalid base64: {exc}", label) from exc
    return check_size(data, max_file_size, label)


def check_allowed(path: Path, roots: list[Path] | None) -> Path:
    """The real path, if it lies inside one of the roots (symlinks and `..` resolved)."""
    if roots is None:
        return path
    try:
        real = path.resolve()
    except (OSError, ValueError) as exc:  # ValueError: a NUL character in the path
        raise InvalidImageError(f"not a usable path: {exc}", str(path)) from None
    if not roots:  # a server's default: it reads no local path
        raise SourceNotAllowedError(
            "no local path is read here (IMGEMBED_ALLOWED_ROOTS names no folder to read)",
            str(path),
        )
    if not any(real.is_relative_to(root) for root in roots):
        raise SourceNotAllowedError(
            f"outside the allowed roots ({', '.join(map(str, roots))})", str(path)
        )
    return real


def read_file(
    path: Path, max_file_size: int, roots: list[Path] | None = None, deadline: float = 30.0
) -> bytes:
    """The bytes of a regular file, read within the size limit and `deadline` seconds.

    Only regular files are read: a FIFO, a device (/dev/zero, /dev/random), a socket or a
    directory is refused. It is opened non-blocking, so opening a FIFO never waits for a
    writer, and a /proc file that would block fails at once. The deadline is checked between
    reads of READ_CHUNK (a single read that hangs, as on a dead network mount, is not cut)."""
    label = str(path)
    try:
        real = check_allowed(path, roots)
        fd = os.open(real, _OPEN_FLAGS)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ImageNotFoundError(_not_regular(info.st_mode), label)
            if info.st_size > max_file_size:
                raise ImageTooLargeError(_too_large(info.st_size, max_file_size), label)
            return _read_capped(fd, max_file_size, deadline, label)
        finally:
            os.close(fd)
    except FileNotFoundError as exc:
        if os.path.islink(path):
            target = printable(os.readlink(path))
            raise ImageNotFoundError(f"a link to {target}, which does not exist", label) from exc
        raise ImageNotFoundError("no such file", label) from exc
    except PermissionError as exc:
        raise ImageNotFoundError("permission denied", label) from exc
    except BlockingIOError as exc:  # e.g. a /proc file with nothing to read yet
        raise ImageNotFoundError("not a regular file: reading it would block", label) from exc
    except RuntimeError as exc:  # Path.resolve on a symlink loop
        raise ImageNotFoundError(f"cannot resolve: {exc}", label) from exc
    except OSError as exc:  # loops, names too long, I/O errors, sockets (ENXIO)
        raise ImageNotFoundError(f"cannot read: {exc.strerror or exc}", label) from exc


def _read_capped(fd: int, limit: int, deadline: float, label: str) -> bytes:
    # Read one byte past the limit instead of trusting stat: files grow, /proc files say 0.
    stop = time.monotonic() + deadline
    chunks, total = [], 0
    while total <= limit:
        if chunks and time.monotonic() > stop:
            raise ImageNotFoundError(f"not read within {deadline:g} s (fetch_deadline)", label)
        chunk = os.read(fd, min(READ_CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    size = os.fstat(fd).st_size  # the real size, where the file system knows it
    if size > limit:
        raise ImageTooLargeError(_too_large(size, limit), label)
    raise ImageTooLargeError(f"more than {limit:,} bytes, over the limit (max_file_size)", label)


def _not_regular(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "not a file (a directory)"
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}  # fmt: skip
    kind = next((name for test, name in kinds.items() if test(mode)), "special")
    return f"not a regular file ({kind})"


def expand_paths(
    paths: Iterable[str | os.PathLike[str]],
    extensions: Iterable[str],
    failures: list[ImageError] | None = None,
) -> list[Path | str]:
    """Files as given, URLs and data URIs untouched; folders walked recursively (sorted;
    symlinked folders are not followed, so link loops cannot recur) for files with one of
    the extensions. A folder that cannot be listed (permissions, I/O errors) does not stop
    the walk: it goes to `failures` as an ImageNotFoundError if a list is given, otherwise
    it stays in the result, so that reading it fails as that entry's typed error. So does a
    folder with no such file in it."""
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
        if is_url(entry) or is_data_uri(entry) or "://" in str(entry) or not str(entry).strip():
            found.append(str(entry))  # as given: fails on read ('' is no name, not Path('.'))
            continue
        path = Path(entry)
        if not os.path.isdir(path):  # False, not OSError, for a name too long to look up
            found.append(path)
            continue
        before = len(found), len(failures or ())
        for root, dirs, files in os.walk(path, onerror=unreadable):
            dirs.sort()
            found.extend(
                Path(root, name) for name in sorted(files) if Path(name).suffix.lower() in wanted
            )
        if (len(found), len(failures or ())) == before:
            # an empty or mistyped folder must not pass as a job with nothing to do
            empty = f"folder holds no images ({', '.join(sorted(wanted))})"
            if failures is None:
                found.append(path)
            else:
                failures.append(ImageNotFoundError(empty, str(path)))
    return found
