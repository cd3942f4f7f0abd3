"""What to index: folders, single files and URLs, or list files: `.txt` (a path or URL per
line) and `.csv` / `.jsonl` catalogues with an image column, an optional `id` and any other
columns as metadata. Relative paths in list files are relative to the list file."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgembed.errors import ConfigurationError
from imgembed.intake.sources import expand_paths, is_data_uri, is_url

IMAGE_COLUMNS = ("image", "image_url", "image_path", "url", "path", "source", "file")
LIST_SUFFIXES = {".txt", ".lst", ".csv", ".jsonl", ".ndjson"}


@dataclass(frozen=True)
class IndexItem:
    id: str
    source: str  # a path or URL
    metadata: dict[str, Any] = field(default_factory=dict)


def read_index_sources(entries: Iterable[str], extensions: Iterable[str]) -> list[IndexItem]:
    """Items in order; a repeated id keeps its first occurrence."""
    extensions = list(extensions)
    items: list[IndexItem] = []
    for entry in entries:
        path = Path(entry)
        if not is_url(entry) and path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            items += _read_list(path)
        else:
            items += [IndexItem(_stable(s), _stable(s)) for s in expand_paths([entry], extensions)]
    unique: dict[str, IndexItem] = {}
    for item in items:
        unique.setdefault(item.id, item)
    return list(unique.values())


def _read_list(path: Path) -> list[IndexItem]:
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if suffix == ".csv":
            rows: Iterable[dict[str, Any]] = list(csv.DictReader(handle))
        elif suffix in (".jsonl", ".ndjson"):
            rows = [_json_line(line, path, n) for n, line in enumerate(handle, 1) if line.strip()]
        else:
            rows = [{"image": line.strip()} for line in handle if line.strip()]
    return [_item(row, path, n) for n, row in enumerate(rows, 1)]


def _stable(source: str | Path) -> str:
    """Ids of local files are absolute paths (symlinks kept), so they do not depend on the
    directory a run started in: re-runs match and --prune never drops a file by accident."""
    if is_url(source) or is_data_uri(source):
        return str(source)
    return os.path.abspath(source)


def _json_line(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{path}:{number}: not JSON: {exc}") from exc
    if not isinstance(row, dict):
        raise ConfigurationError(f"{path}:{number}: expected a JSON object")
    return row


def _item(row: dict[str, Any], path: Path, number: int) -> IndexItem:
    column = next((c for c in IMAGE_COLUMNS if row.get(c)), None)
    if column is None:
        raise ConfigurationError(
            f"{path}:{number}: no image column (one of {', '.join(IMAGE_COLUMNS)})"
        )
    source = str(row[column]).strip()
    if not (is_url(source) or is_data_uri(source)):
        source = _stable(path.parent / source)  # relative to the list file
    metadata = {k: v for k, v in row.items() if k not in (column, "id") and v not in (None, "")}
    item_id = str(row.get("id") or "").strip() or source
    return IndexItem(item_id, source, metadata)
