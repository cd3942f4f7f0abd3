"""What to index: folders, single files and URLs, or list files: `.txt` (a path or URL per
line) and `.csv` / `.jsonl` catalogues with an image column, an optional `id` and any other
columns as metadata. Relative paths in list files are relative to the list file.

A source that cannot be used becomes an item with its typed `error` (reported as failed,
never stopping the rest): a row without an image or a line that is not JSON (named by its
line in the file), a folder that cannot be listed, a list file that cannot be read, a path
that does not exist (--prune stops when a source could not be read: a mistyped folder must
not look like an emptied one).
CSV/JSONL files must be UTF-8: ids and metadata decoded with a guessed encoding would be
stored wrong without anyone noticing, so such a file fails as a whole, naming the line and
byte. `.txt` lists hold file names, which on Linux are bytes: they are decoded as the
system decodes names (UTF-8, undecodable bytes kept), so every name on disk can be listed.
Ids are printable (imgembed/names.py): a name that is not UTF-8 is stored with `\\xNN`."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgembed.errors import ConfigurationError, ImageError, ImageNotFoundError, SourceListError
from imgembed.intake.sources import expand_paths, is_data_uri, url_scheme
from imgembed.names import printable

IMAGE_COLUMNS = ("image", "image_url", "image_path", "url", "path", "source", "file")
LIST_SUFFIXES = {".txt", ".lst", ".csv", ".jsonl", ".ndjson"}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class IndexItem:
    id: str
    source: str  # a path or URL
    metadata: dict[str, Any] = field(default_factory=dict)
    error: ImageError | None = None  # set when the source itself cannot be used

    @property
    def unknown(self) -> bool:
        """Unusable, and standing for no id (a list or folder that could not be read, a
        row without an id): what it held is unknown, so a run must not prune."""
        return self.error is not None and self.id == self.source


def read_index_sources(entries: Iterable[str], extensions: Iterable[str]) -> list[IndexItem]:
    """Items in order; a repeated id keeps its first occurrence."""
    extensions = list(extensions)
    items: list[IndexItem] = []
    for entry in entries:
        if not entry.strip():  # Path("") is the current folder: '' names nothing
            error = ImageNotFoundError("empty path: give a file, a URL or image data", repr(entry))
            items.append(_failed(entry, error))
            continue
        path = Path(entry)
        remote = url_scheme(entry) or is_data_uri(entry)
        if not remote and path.suffix.lower() in LIST_SUFFIXES and os.path.isfile(path):
            items += _read_list(path) or [_empty_list(path)]
            continue
        if not remote and not os.path.lexists(path):
            missing = _stable(entry)
            items.append(_failed(missing, ImageNotFoundError("no such file", missing)))
            continue
        failures: list[ImageError] = []
        found = expand_paths([entry], extensions, failures)
        items += [IndexItem(printable(_stable(s)), _stable(s)) for s in found]
        items += [_failed(error.source or str(path), error) for error in failures]
    return unique_items(items)


def index_items(entries: Iterable[Any], extensions: Iterable[str]) -> list[IndexItem]:
    """Sources (folders, files, URLs, list files) and IndexItems, in order, as the unique
    items an index run takes (what a request's `sources` and `items` name together)."""
    items: list[IndexItem] = []
    for entry in entries:
        if isinstance(entry, IndexItem):
            items.append(entry)
        elif isinstance(entry, str | os.PathLike):
            items += read_index_sources([os.fspath(entry)], extensions)
        else:
            raise ConfigurationError(
                f"index takes IndexItems or sources (folders, files, URLs, lists), not "
                f"{type(entry).__name__} {entry!r:.60}"
            )
    return unique_items(items)


def unique_items(items: Iterable[IndexItem]) -> list[IndexItem]:
    """One item per id: the first is kept; a later one with another source fails, naming
    the one kept (a collection holds one item per id: both stored, the second would
    silently replace the first, and every re-run would store them again in turn); an exact
    repeat is dropped. Items already failed stay as they are, so this may run again over
    its own result (the HTTP route adds the request's items to those of its sources)."""
    unique: dict[str, IndexItem] = {}
    clashes: list[IndexItem] = []
    for item in items:
        first = unique.setdefault(item.id, item)
        if first is item or first.source == item.source:
            continue
        if first.error is not None and item.error is None:  # the first is no item: this is
            unique[item.id] = item
            clashes.append(first)
            continue
        if item.error is not None:
            clashes.append(item)
            continue
        # a name with bytes that are not UTF-8 is written with \xNN, as a name holding
        # those four characters is: the second file would be dropped without a word
        named = "" if item.id == printable(item.source) else f" ({item.id!r})"  # a row's
        clash = ImageError(
            f"the same id{named} as {first.source!r}, which is kept; rename one",
            printable(item.source),
        )
        clashes.append(_failed(item.source, clash, item.id))
    return [*unique.values(), *clashes]


def _read_list(path: Path) -> list[IndexItem]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [_failed(str(path), ImageNotFoundError(f"cannot read: {exc.strerror}", str(path)))]
    if path.suffix.lower() in (".txt", ".lst"):
        text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
        lines = [line for line in _LINE_BREAK.split(text) if line.strip()]
        return [_path_item(_name(line, path), path) for line in lines]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, column = _position(data, exc.start)
        label = f"{printable(str(path))}:{line}"
        error = SourceListError(
            f"not UTF-8: byte 0x{data[exc.start]:02x} at column {column} cannot be decoded; "
            "list files are read as UTF-8, so save it as UTF-8 "
            "(e.g. iconv -f cp1252 -t utf-8 old.csv > new.csv) and index it again",
            label,
        )
        return [_failed(label, error)]
    rows = _csv_rows(text) if path.suffix.lower() == ".csv" else _json_rows(text)
    return [_item(row, path, line) for line, row in rows]


def _empty_list(path: Path) -> IndexItem:
    """A list naming no image (empty, blank lines, a header only: an export that wrote
    nothing) fails as an empty folder does: not a run with nothing to do, nor one that prunes."""
    label = printable(str(path))
    return _failed(label, SourceListError("list holds no images (empty, or a header only)", label))


def _position(data: bytes, offset: int) -> tuple[int, int]:
    """(line, column) of a byte offset, both from 1, columns counted in bytes."""
    before = data[:offset]
    start = max(before.rfind(b"\n"), before.rfind(b"\r")) + 1
    lines = len(_LINE_BREAK.findall(before.decode("utf-8", "replace")))
    return lines + 1, offset - start + 1


def _csv_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | SourceListError]]:
    """(the file line a row starts on, the row by header name); blank lines skipped."""
    reader = csv_reader(io.StringIO(text, newline=""), csv_delimiter(text))
    header: list[str] | None = None
    while True:
        line = reader.line_num + 1  # a quoted field may span lines: the row starts here
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield line, SourceListError(f"not valid CSV: {exc}")
            continue
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [name.strip() for name in row]
        else:
            yield line, dict(zip(header, row, strict=False))


# Python's csv refuses a field over 128 KiB; a data: URI of an image is easily longer (one of
# max_file_size, 10 MB: 13.4 MB), a product description may be. The limit is process-wide.
CSV_FIELD_LIMIT = 64 * 1024 * 1024


def csv_reader(lines: Iterator[str], delimiter: str, strict: bool = False) -> Any:
    """csv.reader with fields up to CSV_FIELD_LIMIT (a limit set higher elsewhere stays)."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    return csv.reader(lines, delimiter=delimiter, strict=strict)


def csv_delimiter(text: str) -> str:
    """',' or what the header line is separated by: Excel in Dutch or German locales
    writes ';' (the comma is their decimal mark), some exports a tab."""
    header = next((line for line in text.splitlines() if line.strip()), "")
    return max((",", ";", "\t"), key=header.count) if header else ","


_JSON_TYPES = {dict: "an object", list: "an array", bool: "true/false"}


def _json_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | SourceListError]]:
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, SourceListError(f"not JSON: {exc}")
            continue
        except RecursionError:
            yield number, SourceListError("not JSON: nested too deeply to read")
            continue
        if not isinstance(row, dict):
            yield number, SourceListError(f"expected a JSON object, not {type(row).__name__}")
            continue
        yield number, row


def _stable(source: str | Path) -> str:
    """Ids of local files are absolute paths (symlinks kept), so they do not depend on the
    directory a run started in: re-runs match and --prune never drops a file by accident."""
    if url_scheme(source) or is_data_uri(source):  # ftp://: refused as written, not a file
        return str(source)
    return os.path.abspath(source)


def _name(line: str, list_file: Path) -> str:
    """A list line's name: without the blanks around it, unless a file is named with them
    (" lead.jpg" on disk is listed as it is)."""
    name = line.strip()
    if name != line and not (url_scheme(name) or is_data_uri(name)):
        with contextlib.suppress(OSError, ValueError):
            if (list_file.parent / line).exists():
                return line
    return name


def _path_item(source: str, list_file: Path) -> IndexItem:
    if not (url_scheme(source) or is_data_uri(source)):
        source = _stable(list_file.parent / source)  # relative to the list file
    return IndexItem(printable(source), source)


def _failed(label: str, error: ImageError, item_id: str | None = None) -> IndexItem:
    label = printable(label)
    return IndexItem(item_id or label, label, error=error)


def _field(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "" if value is None else str(value).strip()


def _item(row: dict[str, Any] | SourceListError, path: Path, line: int) -> IndexItem:
    label = f"{printable(str(path))}:{line}"
    if isinstance(row, SourceListError):
        row.source = label
        return _failed(label, row)
    for key in ("id", *IMAGE_COLUMNS):  # a JSON row's object or array is no name
        value = row.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, str | int | float)
        ):
            kind = _JSON_TYPES.get(type(value), type(value).__name__)
            return _failed(
                label, SourceListError(f"{key!r} must be text or a number, not {kind}", label)
            )
    row_id = _field(row, "id")  # 0 is an id
    column = next((c for c in IMAGE_COLUMNS if _field(row, c)), None)
    if column is None:
        error = SourceListError(f"no image: none of {', '.join(IMAGE_COLUMNS)} has a value", label)
        return _failed(label, error, row_id)  # a catalogue's own id names it best
    item = _path_item(str(row[column]).strip(), path)
    metadata = {k: v for k, v in row.items() if k not in (column, "id") and v not in (None, "")}
    return IndexItem(row_id or item.id, item.source, metadata)
