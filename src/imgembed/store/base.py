"""The VectorStore protocol and the records that cross it. Backends: postgres.py (pgvector,
embedded or external) and qdrant.py (local or server)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from imgembed.errors import CollectionNotFoundError, InvalidRecordError, StoreBusyError
from imgembed.names import has_control, printable


@dataclass(frozen=True)
class Provenance:
    """What made a collection's vectors; only vectors of equal provenance are comparable."""

    model: str
    pretrained: str
    dimension: int
    preprocess: str  # fingerprint of the model's transform and intake version

    def describe(self) -> str:
        return f"{self.model} ({self.pretrained}), {self.dimension}-d, preprocess {self.preprocess}"


T = TypeVar("T")


def each_on_refusal(
    write: Callable[[list[T]], None],
    items: list[T],
    refused: Callable[[T, InvalidRecordError], None],
) -> None:
    """`write(items)` in one transaction; if the database refuses a value in them, each item
    alone, so that the one it refuses goes to `refused` and the others are stored."""
    try:
        write(items)
    except InvalidRecordError as exc:
        if len(items) == 1:
            refused(items[0], exc)
            return
        for item in items:
            each_on_refusal(write, [item], refused)


def vector_size(vector: Any) -> int | None:
    """How many numbers, if it can tell (a ragged one is for checked_vector to refuse)."""
    try:
        return int(np.size(vector))
    except (TypeError, ValueError):
        return None


def checked_vector(vector: Any, dimension: int, what: str) -> np.ndarray:
    """A finite, non-zero float32 vector of the collection's dimension, or an
    InvalidRecordError."""
    try:
        with np.errstate(over="ignore"):  # too large for float32: infinity, refused below
            array = np.asarray(vector, dtype=np.float32).ravel()
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an int of 10**400
        raise InvalidRecordError(f"{what}: not a vector of numbers ({exc})") from exc
    if array.shape != (dimension,):
        raise InvalidRecordError(
            f"{what}: vector of shape {np.shape(vector)}, "
            f"but the collection has {dimension} dimensions"
        )
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise InvalidRecordError(
            f"{what}: vector has non-finite values (NaN or infinity at {bad.size} of "
            f"{dimension} positions, first {bad[0]}); it cannot be stored or searched"
        )
    if not array.any():  # pgvector scores it NaN, Qdrant 0: an arbitrary order either way
        raise InvalidRecordError(
            f"{what}: vector is all zeros, a direction no cosine can compare; it cannot be "
            "stored or searched"
        )
    return array


def checked_query(vector: Any, dimension: int) -> np.ndarray:
    """A query as checked_vector checks it, scaled to unit length first (the cosine does
    not change): the half-precision index read a query of tiny values as zeros (another
    order, silently) and refused one of values over 65,504."""
    try:
        array = np.asarray(vector, dtype=np.float64).ravel()
    except (TypeError, ValueError, OverflowError):
        array = None
    if array is None or array.shape != (dimension,):
        return checked_vector(vector, dimension, "query")  # its error
    with np.errstate(all="ignore"):
        peak = np.abs(array).max()
        if np.isfinite(peak) and peak > 0:  # else checked_vector refuses it
            array = array / peak
            array /= np.linalg.norm(array)
    return checked_vector(array, dimension, "query")


def dropped(name: str, action: str) -> CollectionNotFoundError:
    """A collection found gone in the middle of work on it (another request or process
    dropped it): what was stored in it went with it."""
    return CollectionNotFoundError(
        f"no collection {name!r}: it was dropped (before or during {action}); what was "
        "stored in it is gone too"
    )


def busy(name: str) -> StoreBusyError:
    return StoreBusyError(
        f"another indexing run (another process or server) is writing into collection "
        f"{name!r}; wait for it to finish, then run again: what it stored is skipped"
    )


def checked_name(name: Any) -> str:
    """A new collection's name: text, not blank, without "/" (it names the collection in
    HTTP paths, where an encoded slash is decoded before routing) or control characters, and
    not "." or ".." (browsers and HTTP clients resolve those path segments away, "%2E%2E"
    too: /collections/../duplicates asks for /duplicates), as store ids."""
    checked_text(name, "collection name")
    if not name.strip() or "/" in name or has_control(name):
        raise InvalidRecordError(
            f"collection name {printable(name)!r}: not blank, without '/' or control characters"
        )
    if name in (".", ".."):
        raise InvalidRecordError(
            f"collection name {name!r}: '.' and '..' name no collection in a URL path (HTTP "
            "clients resolve them away: /api/v1/collections/../duplicates is /api/v1/"
            "duplicates); choose another"
        )
    return name


def never_stored(*texts: Any) -> bool:
    """True if any text holds a NUL character: none was ever stored (PostgreSQL text cannot
    hold it), so a read or delete of one finds nothing, as on Qdrant, instead of a query the
    database refuses. Text that is not UTF-8 is still refused (say how to escape)."""
    return any(isinstance(text, str) and "\x00" in text for text in texts)


def storable_ids(ids: Iterable[Any]) -> list[Any]:
    """The ids but those `never_stored`."""
    return [id_ for id_ in ids if not never_stored(id_)]


def checked_text(value: Any, what: str) -> str:
    """Text the store can hold: valid UTF-8 (no lone surrogates), no NUL characters."""
    if not isinstance(value, str):
        raise InvalidRecordError(f"{what} must be text, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRecordError(
            f"{what} is not valid UTF-8: '{printable(value)}' (a file name in another "
            "encoding?); escape it first, as indexing does (imgembed.names.printable)"
        ) from exc
    if "\x00" in value:
        raise InvalidRecordError(f"{what} contains a NUL character: {value!r}")
    return value


def checked_metadata(metadata: Mapping[str, Any], what: str) -> str:
    """The metadata as JSON text, or an InvalidRecordError naming what cannot be stored."""
    for text in _texts(metadata):
        checked_text(text, f"metadata of {what}")
    try:
        return json.dumps(metadata, default=str, allow_nan=False, ensure_ascii=False)
    except ValueError as exc:  # NaN or infinity: JSON has no spelling for them
        raise InvalidRecordError(f"metadata of {what}: {exc}") from exc


def checked_filter(filters: Mapping[str, Any]) -> str:
    """A search filter as checked_metadata checks it, without an empty list or object at
    any depth: such a value names nothing to match (PostgreSQL matched any list or object
    there, Qdrant every item)."""
    for key, value in filters.items():
        empty = _empty_part(value, str(key))
        if empty is not None:
            raise InvalidRecordError(
                f"the search filter on {empty!r} is empty: give a value to match, or leave "
                "the key out"
            )
    return checked_metadata(dict(filters), "the search filter")


def _empty_part(value: Any, path: str) -> str | None:
    if isinstance(value, Mapping | list | tuple) and not value:
        return path
    if isinstance(value, Mapping):
        for key, item in value.items():
            empty = _empty_part(item, f"{path}.{key}")
            if empty is not None:
                return empty
    return None


def checked_record(record: Record, dimension: int) -> tuple[np.ndarray, str]:
    """Validates a record before any driver sees it: (its vector, its metadata as JSON)."""
    label = checked_text(record.id, "id")
    checked_text(record.source, f"source of {label}")
    checked_text(record.content_hash, f"content hash of {label}")
    vector = checked_vector(record.vector, dimension, label)
    return vector, checked_metadata(record.metadata, label)


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _texts(key)
            yield from _texts(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _texts(item)


@dataclass
class Record:
    id: str
    vector: np.ndarray
    content_hash: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredItem:
    """What incremental indexing compares with an item: is it stored as it is now?"""

    content_hash: str
    source: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # cosine similarity
    source: str
    content_hash: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    backend: str
    provenance: Provenance
    count: int


class VectorStore(Protocol):
    backend: str

    def create_collection(self, name: str, provenance: Provenance) -> CollectionInfo:
        """Create, or return the existing one; a different provenance is an error."""
        ...

    def get_collection(self, name: str) -> CollectionInfo: ...

    def provenance(self, name: str) -> Provenance:
        """The collection's provenance without counting its items (asked on every search)."""
        ...

    def collections(self) -> list[CollectionInfo]: ...

    def drop_collection(self, name: str) -> None: ...

    def upsert(self, name: str, records: Sequence[Record]) -> None:
        """Insert or replace by id, atomically for the whole batch."""
        ...

    def get(self, name: str, ids: Iterable[str]) -> list[Record]: ...

    def hashes(self, name: str) -> dict[str, str]:
        """id -> content hash of everything stored."""
        ...

    def stored_items(self, name: str) -> dict[str, StoredItem]:
        """id -> hash, source and metadata of everything stored (no vectors)."""
        ...

    def delete(self, name: str, ids: Iterable[str]) -> int: ...

    def count(self, name: str) -> int: ...

    def search(
        self,
        name: str,
        vector: np.ndarray,
        top_k: int = 10,
        filters: Mapping[str, Any] | None = None,
        exact: bool = False,
    ) -> list[Hit]:
        """Nearest by cosine, best first; `filters` match metadata keys exactly; `exact`
        scans everything instead of using the approximate index."""
        ...

    def bulk_load(self, name: str, incoming: int) -> bool:
        """Before storing `incoming` new items: whether the store takes them as a bulk load
        (its approximate index built afterwards, by `refresh`)."""
        ...

    def refresh(
        self, name: str, changed: bool = True, waiting: Callable[[str], None] | None = None
    ) -> None:
        """After a run: build what a bulk load set aside (also after a stopped run), and
        refresh the statistics searches depend on if rows `changed`. Safe to call any time.
        `waiting(what)` is called every half second while a build runs; what it raises (a
        job stopped) stops the build, and is raised."""
        ...

    def writing(self, name: str) -> AbstractContextManager[None]:
        """Held by an indexing run: one run per collection at a time, across processes
        where the store can tell (StoreBusyError for the second)."""
        ...

    def check_not_busy(self, name: str) -> None:
        """StoreBusyError if another process's run holds `writing(name)` now."""
        ...

    def checked_name(self, name: str) -> str:
        """`name` if this store can make a collection of that name, else InvalidRecordError
        (what `create_collection` would refuse, asked before any work)."""
        ...

    def close(self) -> None: ...
