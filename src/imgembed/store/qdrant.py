"""VectorStore on Qdrant: a server or cluster (IMGEMBED_QDRANT_URL + API key), or local files
(qdrant-client's local mode, one process at a time). Provenance lives in a small registry
collection; point ids are UUIDs derived from our ids, which are kept in the payload."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from imgembed.errors import (
    CollectionNotFoundError,
    InvalidRecordError,
    ProvenanceMismatchError,
    StoreDamagedError,
    StoreError,
    StoreUnavailableError,
)
from imgembed.names import printable
from imgembed.store.base import (
    CollectionInfo,
    Hit,
    Provenance,
    Record,
    StoredItem,
    checked_filter,
    checked_name,
    checked_query,
    checked_record,
    checked_text,
    dropped,
    vector_size,
)
from imgembed.store.faults import store_errors
from imgembed.store.qdrant_local import (
    OPENING,
    REGISTRY,
    missing_files,
    open_local,
    warn_missing,
    writable,
)
from imgembed.store.qdrant_misfits import read_entry
from imgembed.store.qdrant_server import DeadlineClient

log = logging.getLogger(__name__)
T = TypeVar("T")

_NAMESPACE = uuid.UUID("5b3f4c1e-8a52-4d0c-9a51-6c3e7d2f9b10")
_PAGE = 1000
_REFUSED = '<>:"\\|?*'  # Qdrant's characters not allowed in a collection name


def _point_id(item_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, item_id))


class QdrantStore:
    """Every call turns client errors into typed StoreErrors; against a server, a call that
    lost its connection, or got no whole answer within `timeout` (a server may send it a
    byte at a time), is tried once more (the client reconnects by itself). Local files take
    one call at a time: qdrant-client's local mode keeps each collection in arrays and one
    SQLite connection that threads (a server's requests and jobs) must not share."""

    backend = "qdrant"

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: str | None = None,
        path: Path | None = None,
        timeout: float = 30.0,
    ):
        """`timeout`: how long each call to a server waits for its whole answer."""
        from qdrant_client import QdrantClient, models

        self._models = models
        self._local = not url  # local mode always searches exactly
        self._one_at_a_time = threading.RLock() if self._local else contextlib.nullcontext()
        self._dimensions: dict[str, int] = {}
        self._seen: set[str] = set()  # collections this store made or worked on
        self.location = f"Qdrant at {url}" if url else str(path)
        self._files = None if url else path  # local files
        self._unmended: dict[str, str] = {}  # local collections left misfit: why, what to do
        missing: dict[str, Path] = {}  # local collections whose files are gone
        with store_errors(OPENING, self.location), self._writable(OPENING):
            if url:
                self._client = DeadlineClient(url, api_key, timeout)
            else:
                assert path is not None
                Path(path).mkdir(parents=True, exist_ok=True)
                missing = missing_files(Path(path))  # before the client makes them anew
                self._client, self._unmended = open_local(QdrantClient, Path(path))
        if url:
            try:
                self._call(OPENING, self._client.check_version)
                self._call(OPENING, self._ensure_registry)
            except BaseException:
                self._client.close()  # its thread and connections
                raise
        else:
            self._call(OPENING, self._ensure_registry)
            assert path is not None
            self._call(OPENING, lambda: self._list_again(Path(path), missing))

    def _ensure_registry(self) -> None:
        models = self._models
        if not self._client.collection_exists(REGISTRY):
            self._client.create_collection(
                REGISTRY,
                vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT),
            )

    def _list_again(self, path: Path, missing: Mapping[str, Path]) -> None:
        """Collections the registry names whose files are there but not in qdrant-client's
        meta.json (one restored from an older backup): made again over their folder, which
        loads their items; those holding items that the registry does not name (it was lost),
        or whose entry it cannot read, and those it names whose files were `missing` (they
        start empty), are named in a warning."""
        models = self._models
        entries = self._entries()
        registered = [entry[0] for entry in entries.values() if isinstance(entry, tuple)]
        for name in registered:
            if name in missing and not self._client.count(name).count:
                warn_missing(path, name, missing[name], self._provenance(name))
        present = [c.name for c in self._client.get_collections().collections]
        unread = {_point_id(name): name for name in present
                  if isinstance(entries.get(_point_id(name)), str)}  # fmt: skip
        for point_id, name in unread.items():
            log.warning(
                "imgembed's registry of collections %s holds an entry it cannot read (point "
                "%s: %s), that of collection %r, so that collection is not listed: index into "
                "it again with its model, which writes the entry anew (what is stored stays)",
                path / "collection" / REGISTRY, point_id, entries[point_id], name,
            )  # fmt: skip
        unnamed = [
            name
            for name in present
            if name not in registered
            and name not in unread.values()
            and name != REGISTRY
            and self._client.count(name).count
        ]  # an empty one: a create cut short before its registry entry
        if unnamed:
            log.warning(
                "Qdrant's local collections %s hold items, but imgembed's registry of "
                "collections %s does not name them (it was lost, or restored from an older "
                "backup), so their model is not known and they are not listed: index into "
                "each again with its model (what is stored stays), or restore the registry",
                ", ".join(map(repr, sorted(unnamed))), path / "collection" / REGISTRY,
            )  # fmt: skip
        for name in registered:
            folder = path / "collection" / name
            if self._client.collection_exists(name) or not (folder / "storage.sqlite").is_file():
                continue  # listed, or a drop cut short (its files gone)
            if (provenance := self._provenance(name)) is None:
                continue
            self._client.create_collection(
                name,
                vectors_config=models.VectorParams(
                    size=provenance.dimension, distance=models.Distance.COSINE
                ),
            )
            log.warning(
                "Qdrant's local collection %r was not listed in %s, though its files are in "
                "%s: listed again, with its %d items",
                name, path / "meta.json", folder, self._client.count(name, exact=True).count,
            )  # fmt: skip

    def _writable(self, action: str) -> contextlib.AbstractContextManager[None]:
        """Local files: a write refused there is a DataDirError naming the folder."""
        return writable(Path(self._files), action) if self._files else contextlib.nullcontext()

    def _call(self, action: str, work: Callable[[], T]) -> T:
        try:
            with self._one_at_a_time, store_errors(action, self.location), self._writable(action):
                return work()
        except StoreUnavailableError as lost:
            if self._local:
                raise
            log.warning("%s; trying once more", lost)
            time.sleep(1.0)
        with store_errors(action, self.location):
            return work()

    def _on(self, name: str, action: str, work: Callable[[], T]) -> T:
        """Work on a collection: one another request dropped (or never made) is
        CollectionNotFoundError, not a client error; said to be dropped only if this store
        knew it (one never made lost nothing)."""
        try:
            done = self._call(action, work)
        except StoreError as exc:
            if not _no_collection(exc.__cause__):
                if name in self._unmended and not isinstance(exc, CollectionNotFoundError):
                    raise StoreDamagedError(f"{action} failed: {self._unmended[name]}") from exc
                raise
            known = name in self._seen or name in self._dimensions
            self._seen.discard(name)
            self._dimensions.pop(name, None)
            if not known:
                raise CollectionNotFoundError(f"no collection {name!r}") from exc
            raise dropped(name, action) from exc
        self._seen.add(name)
        return done

    def checked_name(self, name: str) -> str:
        return _checked_name(name)

    def create_collection(self, name: str, provenance: Provenance) -> CollectionInfo:
        _checked_name(name)
        self._call(f"creating collection {name!r}", lambda: self._create(name, provenance))
        self._seen.add(name)
        return self.get_collection(name)

    def _create(self, name: str, provenance: Provenance) -> None:
        models = self._models
        existing = None  # a registry entry a drop cut short left behind names nothing now
        if not self._client.collection_exists(name):
            self._client.create_collection(
                name,
                vectors_config=models.VectorParams(
                    size=provenance.dimension, distance=models.Distance.COSINE
                ),
            )
        else:
            existing = self._provenance(name)
        if existing is None:
            self._client.upsert(
                REGISTRY,
                points=[models.PointStruct(id=_point_id(name), vector=[1.0],
                                           payload={"name": name, **vars(provenance)})],
            )  # fmt: skip
        elif existing != provenance:
            raise ProvenanceMismatchError(
                f"collection {name!r} holds vectors of {existing.describe()}; "
                f"they cannot be mixed with {provenance.describe()}"
            )

    def _provenance(self, name: str) -> Provenance | None:
        """None also for an entry it cannot read: `_create` writes it anew."""
        points = self._client.retrieve(REGISTRY, ids=[_point_id(name)], with_payload=True)
        entry = read_entry(points[0].payload) if points else None
        return entry[1] if isinstance(entry, tuple) else None

    def _dimension(self, name: str, size: int | None = None) -> int:
        """Without counting points (the hot path: every search and upsert); read again for a
        vector of another `size` (the collection may have been made again elsewhere)."""
        if name not in self._dimensions or size not in (None, self._dimensions[name]):
            checked_text(name, "collection name")
            provenance = self._call(f"reading collection {name!r}", lambda: self._provenance(name))
            if provenance is None:
                raise CollectionNotFoundError(f"no collection {name!r}")
            self._dimensions[name] = provenance.dimension
        return self._dimensions[name]

    def get_collection(self, name: str) -> CollectionInfo:
        checked_text(name, "collection name")
        return self._call(f"reading collection {name!r}", lambda: self._get_collection(name))

    def _get_collection(self, name: str) -> CollectionInfo:
        provenance = self._provenance(name)
        if provenance is None or not self._client.collection_exists(name):
            raise CollectionNotFoundError(f"no collection {name!r}")
        return CollectionInfo(name, self.backend, provenance, self.count(name))

    def provenance(self, name: str) -> Provenance:
        checked_text(name, "collection name")
        provenance = self._call(f"reading collection {name!r}", lambda: self._provenance(name))
        if provenance is None:
            raise CollectionNotFoundError(f"no collection {name!r}")
        return provenance

    def collections(self) -> list[CollectionInfo]:
        return self._call("listing collections", self._collections)

    def _registered(self) -> list[str]:
        """The names in the registry (a drop cut short may leave one without collection)."""
        return [entry[0] for entry in self._entries().values() if isinstance(entry, tuple)]

    def _entries(self) -> dict[str, tuple[str, Provenance] | str]:
        """The registry's entries by point id: each its collection and model, or why it
        cannot be read."""
        entries = {}
        offset = None
        while True:
            points, offset = self._client.scroll(
                REGISTRY, limit=_PAGE, offset=offset, with_payload=True
            )
            entries.update({str(p.id): read_entry(p.payload) for p in points})
            if offset is None:
                return entries

    def _collections(self) -> list[CollectionInfo]:
        infos = []
        for name in sorted(self._registered()):
            # a drop cut short between its two steps (a crash), or one by another process
            # meanwhile, leaves a name without its collection: not listed, not an error
            with contextlib.suppress(CollectionNotFoundError):
                infos.append(self._get_collection(name))
        return infos

    def drop_collection(self, name: str) -> None:
        checked_text(name, "collection name")
        self._dimensions.pop(name, None)
        self._seen.discard(name)
        self._unmended.pop(name, None)  # what did not fit goes with it

        def drop() -> None:  # also ends a drop cut short: the registry's entry goes
            if self._provenance(name) is None:
                raise CollectionNotFoundError(f"no collection {name!r}")
            if self._client.collection_exists(name):
                self._client.delete_collection(name)
            self._client.delete(
                REGISTRY, points_selector=self._models.PointIdsList(points=[_point_id(name)])
            )

        self._call(f"dropping collection {name!r}", drop)

    def upsert(self, name: str, records: Sequence[Record]) -> None:
        if not records:
            return
        dimension = self._dimension(name, vector_size(records[0].vector))
        points = []
        for record in records:
            vector, _ = checked_record(record, dimension)
            payload = {"id": record.id, "content_hash": record.content_hash,
                       "source": record.source, "metadata": record.metadata}  # fmt: skip
            points.append(
                self._models.PointStruct(
                    id=_point_id(record.id), vector=vector.tolist(), payload=payload
                )
            )
        self._on(
            name,
            f"storing {len(points)} items in {name!r}",
            lambda: self._client.upsert(name, points=points, wait=True),
        )

    def get(self, name: str, ids: Iterable[str]) -> list[Record]:
        ids = list(ids)
        points = self._on(
            name,
            f"reading items of {name!r}",
            lambda: self._client.retrieve(
                name, ids=[_point_id(i) for i in ids], with_payload=True, with_vectors=True
            ),
        )
        records = [
            Record(
                p.payload["id"],
                np.asarray(p.vector, dtype=np.float32),
                p.payload["content_hash"],
                p.payload["source"],
                p.payload.get("metadata") or {},
            )
            for p in points
        ]
        return sorted(records, key=lambda r: r.id)

    def hashes(self, name: str) -> dict[str, str]:
        return self._on(
            name,
            f"reading the content hashes of {name!r}",
            lambda: {p["id"]: p["content_hash"] for p in self._payloads(name, ["content_hash"])},
        )

    def stored_items(self, name: str) -> dict[str, StoredItem]:
        fields = ["content_hash", "source", "metadata"]
        return self._on(
            name,
            f"reading what is stored in {name!r}",
            lambda: {
                p["id"]: StoredItem(p["content_hash"], p["source"], p.get("metadata") or {})
                for p in self._payloads(name, fields)
            },
        )

    def _payloads(self, name: str, fields: list[str]) -> Iterator[dict[str, Any]]:
        """The id and these payload fields of every point, page by page."""
        offset = None
        while True:
            points, offset = self._client.scroll(
                name, limit=_PAGE, offset=offset, with_payload=["id", *fields]
            )
            yield from (p.payload or {} for p in points)
            if offset is None:
                return

    def delete(self, name: str, ids: Iterable[str]) -> int:
        ids = list(ids)

        def delete() -> int:
            wanted = [_point_id(i) for i in ids]
            present = len(self._client.retrieve(name, ids=wanted)) if wanted else 0
            if present:
                selector = self._models.PointIdsList(points=wanted)
                self._client.delete(name, points_selector=selector)
            return present

        return self._on(name, f"deleting {len(ids)} items from {name!r}", delete)

    def count(self, name: str) -> int:
        return self._on(
            name, f"counting {name!r}", lambda: self._client.count(name, exact=True).count
        )

    def search(
        self,
        name: str,
        vector: np.ndarray,
        top_k: int = 10,
        filters: Mapping[str, Any] | None = None,
        exact: bool = False,
    ) -> list[Hit]:
        models = self._models
        dimension = self._dimension(name, vector_size(vector))
        query = checked_query(vector, dimension)
        condition = None
        if filters:
            checked_filter(filters)
            condition = models.Filter(must=_conditions(models, "metadata", dict(filters)))
        params = models.SearchParams(exact=True) if exact and not self._local else None
        points = self._on(
            name,
            f"searching {name!r}",
            lambda: (
                self._client.query_points(
                    name,
                    query=query.tolist(),
                    limit=top_k,
                    query_filter=condition,
                    with_payload=True,
                    search_params=params,
                ).points
            ),
        )
        return [
            Hit(
                p.payload["id"],
                float(p.score),
                p.payload["source"],
                p.payload["content_hash"],
                p.payload.get("metadata") or {},
            )
            for p in points
        ]

    def writing(self, name: str) -> contextlib.AbstractContextManager[None]:
        """No lock: local mode has one process anyway; two runs against a server both do the
        work (by id: nothing is stored twice)."""
        return contextlib.nullcontext()

    def check_not_busy(self, name: str) -> None:
        """Qdrant cannot tell (see `writing`)."""

    def bulk_load(self, name: str, incoming: int) -> bool:
        """Qdrant indexes segments in the background as they fill: nothing to set aside."""
        self._dimension(name)  # raises for an unknown collection
        return False

    def refresh(
        self, name: str, changed: bool = True, waiting: Callable[[str], None] | None = None
    ) -> None:
        """Qdrant keeps its own statistics and index."""

    def close(self) -> None:
        with self._one_at_a_time, store_errors("closing Qdrant", self.location):
            self._client.close()


def _checked_name(name: str) -> str:
    """A new collection's name as Qdrant (server and local files) takes it: besides what no
    store takes (checked_name: not '.' or '..' either), none of its refused characters, at
    most 255 bytes (a file name), and not imgembed's registry."""
    checked_name(name)
    refused = "".join(sorted({c for c in name if c in _REFUSED}))
    if refused or len(name.encode()) > 255 or name == REGISTRY:
        why = (
            f"Qdrant takes no {' '.join(refused)} in names" if refused
            else f"{REGISTRY!r} is imgembed's registry of collections" if name == REGISTRY
            else "Qdrant names are at most 255 bytes"
        )  # fmt: skip
        raise InvalidRecordError(f"collection name {printable(name)!r}: {why}; choose another")
    return name


def _conditions(models: Any, path: str, value: Any) -> list[Any]:
    """A filter as Qdrant conditions that match as the PostgreSQL store's filter does:
    keys exactly (quoted in the path: a key may hold spaces, dots or brackets), an object
    by its keys, a list by each of its values, a number by its value (3.0 matches 3), null
    by null, one value also a list holding it; other values as their text, as the Postgres
    store writes them."""
    if isinstance(value, Mapping):
        return [
            condition
            for key, item in value.items()
            for condition in _conditions(models, f"{path}.{_quoted(str(key))}", item)
        ]
    if isinstance(value, list | tuple):
        if any(isinstance(item, Mapping | list | tuple) for item in value):
            raise InvalidRecordError(
                f"the search filter on {path!r}: Qdrant matches a list by its values, not "
                "by objects or lists inside it"
            )
        return [condition for item in value for condition in _conditions(models, path, item)]
    if value is None:
        return [models.IsNullCondition(is_null=models.PayloadField(key=path))]
    if isinstance(value, float):  # MatchValue takes no floats
        return [models.FieldCondition(key=path, range=models.Range(gte=value, lte=value))]
    if not isinstance(value, bool | int | str):
        value = str(value)
    match = models.FieldCondition(key=path, match=models.MatchValue(value=value))
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2**53:
        return [match]
    same = models.FieldCondition(key=path, range=models.Range(gte=value, lte=value))
    return [models.Filter(should=[match, same])]  # 3 matches 3.0 too, as in PostgreSQL


def _quoted(key: str) -> str:
    """A metadata key as one step of a Qdrant JSON path, which has no escape for '"'."""
    if '"' in key:
        raise InvalidRecordError(
            f"the search filter: key {key!r} holds a double quote, which Qdrant's paths "
            "cannot express"
        )
    return f'"{key}"'


def _no_collection(exc: BaseException | None) -> bool:
    """Whether the client said the collection does not exist (local mode: a ValueError;
    a server: 404)."""
    from qdrant_client.http.exceptions import UnexpectedResponse

    if isinstance(exc, UnexpectedResponse):
        return exc.status_code == 404
    text = str(exc)
    return (
        isinstance(exc, ValueError)
        and text.startswith("Collection ")
        and text.endswith("not found")
    )
