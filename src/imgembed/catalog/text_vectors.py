"""What every text embedder (text.py, text_api.py) gives: unit float32 rows, checked here
before anything stores them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from imgembed.engine.similarity import l2_normalize
from imgembed.errors import TextEmbeddingError


class TextEmbedder(Protocol):
    name: str  # provenance: equal names give comparable vectors

    def dimension(self) -> int:
        """Width of the vectors (an API embedder may ask its endpoint once)."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dimension) float32, each row unit length."""
        ...

    def close(self) -> None: ...


class UnusableRowsError(TextEmbeddingError):
    """Some texts came back as non-finite or zero vectors: `bad` are their indices, `vectors`
    all rows (unit; the bad ones are placeholders), so the other texts need no new call."""

    def __init__(self, name: str, vectors: np.ndarray, bad: list[int]):
        super().__init__(
            f"{name}: returned non-finite or zero vectors for {len(bad)} of {len(vectors)} texts"
        )
        self.name, self.vectors, self.bad = name, vectors, bad

    def row_error(self) -> str:
        return f"{self.name}: returned a non-finite or zero vector for this text"


def checked_rows(vectors: Any, count: int, name: str) -> np.ndarray:
    """Unit float32 rows; a TextEmbeddingError for a wrong count, an UnusableRowsError for
    rows with non-finite values or zero length."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != count:
        raise TextEmbeddingError(f"{name}: expected {count} vectors, got shape {array.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        bad = ~np.isfinite(array).all(axis=1) | ~np.linalg.norm(array, axis=1).astype(bool)
    if bad.any():
        array = array.copy()
        array[bad] = 1.0  # a placeholder: never stored
        raise UnusableRowsError(
            name, l2_normalize(array).astype(np.float32), list(np.flatnonzero(bad))
        )
    return l2_normalize(array).astype(np.float32)
