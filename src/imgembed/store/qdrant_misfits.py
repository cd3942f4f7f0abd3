"""Local Qdrant collections whose points hold vectors that do not fit their settings (another
length, only named vectors, NaN): qdrant-client loads such points without a word, and then
every search of the collection fails ("shapes (5,3) and (8,) not aligned"), passes over them
(a named vector: counted, never found, and skipped by indexing as unchanged) or ranks them
first (NaN); so does one whose settings name another length than imgembed's registry. Found
on opening in the arrays the client loaded (vectors of mixed lengths it refuses to load)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from imgembed.store.base import Provenance

log = logging.getLogger(__name__)


def misfits(opened: Any, registry: str) -> tuple[dict[str, int], list[str]]:
    """What in an opened local client does not fit: the collections whose settings name
    another vector length than imgembed's registry (its model's), each with that length;
    and those with points that misfit the registry's length, or else their settings' (another
    length, no unnamed vector, NaN or an infinity)."""
    from qdrant_client.http.models import VectorParams

    sizes = _registered_sizes(opened, registry)
    settings, points = {}, []
    for collection in opened.get_collections().collections:
        params = opened.get_collection(collection.name).config.params.vectors
        if not isinstance(params, VectorParams) or params.multivector_config:  # not imgembed's
            continue
        if sizes.get(collection.name, params.size) != params.size:
            settings[collection.name] = sizes[collection.name]
        if _points_misfit(opened, collection.name, sizes.get(collection.name, params.size)):
            points.append(collection.name)
    return settings, points


def _points_misfit(opened: Any, name: str, size: int) -> bool:
    """Whether any point of the collection misfits its settings, read from the client's own
    arrays: a pass over memory (4 ms for 20,000 points of 512 numbers), where reading the
    file again took 650 ms. A client keeping them otherwise: its first point checked."""
    loaded = getattr(getattr(opened, "_client", None), "collections", {}).get(name)
    vectors = getattr(loaded, "vectors", {}).get("")
    missing = getattr(loaded, "deleted_per_vector", {}).get("")  # points without the vector
    if vectors is None or missing is None:
        first, _ = opened.scroll(name, limit=1, with_vectors=True)
        return bool(first) and (
            not isinstance(first[0].vector, list) or len(first[0].vector) != size
        )
    if not len(vectors):  # none loaded: its width is the settings', misfit or not
        return False
    if vectors.dtype.kind not in "biuf":  # a value that is no number (null): not one array
        return True
    finite = np.isfinite(vectors).all()  # NaN or an infinity: scored NaN, ranked first
    return vectors.shape[1] != size or bool(missing.any()) or not finite


def _registered_sizes(opened: Any, registry: str) -> dict[str, int]:
    """The vector length imgembed's registry names for each collection (its model's)."""
    sizes: dict[str, int] = {}
    offset = None
    while opened.collection_exists(registry):
        points, offset = opened.scroll(registry, limit=1000, offset=offset, with_payload=True)
        for point in points:
            entry = read_entry(point.payload)
            if isinstance(entry, tuple):  # else it names none
                sizes[entry[0]] = entry[1].dimension
        if offset is None:
            break
    return sizes


def read_entry(payload: Mapping[str, Any] | None) -> tuple[str, Provenance] | str:
    """A registry entry's collection name and model, or why it holds none (one written by
    hand or by another tool)."""
    fields = dict(payload or {})
    name = fields.pop("name", None)
    wanted = [field.name for field in dataclasses.fields(Provenance)]
    if not isinstance(name, str):
        return "no 'name'" if name is None else f"its 'name' is not text: {name!r}"
    if missing := [field for field in wanted if field not in fields]:
        return f"no {missing[0]!r}"
    if isinstance(fields["dimension"], bool) or not isinstance(fields["dimension"], int):
        return f"its 'dimension' is not a whole number: {fields['dimension']!r}"
    return name, Provenance(**{field: fields[field] for field in wanted})  # others: a newer's


def fit_settings(path: Path, sizes: dict[str, int]) -> list[str]:
    """Set the vector length in meta.json of each collection in `sizes` to the one imgembed's
    registry names: the registry knows the model, and a meta.json restored from before the
    collection was made again with another model does not; items of another length are
    taken out next (`_set_aside_damaged`). The file as it was is kept in damaged/; the
    names."""
    if not sizes:
        return []
    meta = path / "meta.json"
    listed = json.loads(meta.read_text())
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = path / "damaged" / f"meta-{stamp}.json"
    kept.parent.mkdir(exist_ok=True)
    shutil.copy2(meta, kept)
    for name, size in sizes.items():
        vectors = listed["collections"][name]["vectors"]
        log.warning(
            "Qdrant's local collection %r: its settings in %s say vectors of %s numbers, but "
            "imgembed's registry of collections names %d (its model's), so it could not be "
            "searched or stored into: the settings are set to %d, %s as it was kept in %s",
            name, meta, vectors.get("size"), size, size, meta.name, kept,
        )  # fmt: skip
        vectors["size"] = size
    written = meta.with_name(meta.name + ".new")
    written.write_text(json.dumps(listed))
    os.replace(written, meta)  # whole or not at all
    return list(sizes)
