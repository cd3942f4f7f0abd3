"""The VectorStore protocol and the records that cross it. Backends: postgres.py (pgvector,
embedded or external) and qdrant.py (local or server)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from imgembed.errors import StoreError


@dataclass(frozen=True)
class Provenance:
    """What made a collection's vectors; only vectors of equal provenance are comparable."""

    model: str
    pretrained: str
    dimension: int
    preprocess: str  # fingerprint of the model's transform and intake version

    def describe(self) -> str:
        return f"{self.model} ({self.pretrained}), {self.dimension}-d, preprocess {self.preprocess}"


def checked_vector(vector: Any, dimension: int, what: str) -> np.ndarray:
    """A float32 vector of the collection's dimension, or a StoreError saying what is wrong."""
    array = np.asarray(vector, dtype=np.float32).ravel()
    if array.shape != (dimension,):
        raise StoreError(
            f"{what}: vector of shape {np.shape(vector)}, "
            f"but the collection has {dimension} dimensions"
        )
    return array


@dataclass
class Record:
    id: str
    vector: np.ndarray
    content_hash: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)


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
        """id -> content hash of everything stored: what incremental indexing compares."""
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

    def analyze(self) -> None:
        """Refresh query-planner statistics after bulk changes (searches stay fast)."""
        ...

    def close(self) -> None: ...
