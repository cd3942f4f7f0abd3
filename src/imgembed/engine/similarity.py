"""Cosine similarity and top-k, vectorised with NumPy."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from imgembed.errors import ConfigurationError

ArrayLike = Sequence[float] | np.ndarray


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def _scaled(values: np.ndarray, what: str) -> np.ndarray:
    """Finite rows divided by their largest magnitude, as float32: their direction is all a
    cosine needs, and 1e-25 or 1e200 would under- or overflow in float32 otherwise."""
    if not np.isfinite(values).all():
        raise ConfigurationError(f"{what} must be finite numbers (NaN or infinity given)")
    # the largest magnitude of each row, without a temporary the size of the matrix
    peak = np.maximum(values.max(axis=-1, keepdims=True), -values.min(axis=-1, keepdims=True))
    if values.dtype == np.float32 and ((peak == 0) | ((peak > 1e-15) & (peak < 1e15))).all():
        return values  # an encoder's output: nothing to guard against, no copy
    return (values / np.where(peak == 0, 1, peak)).astype(np.float32)


def _matrix(candidates: Sequence[ArrayLike] | np.ndarray, dim: int) -> np.ndarray:
    if not isinstance(candidates, np.ndarray):
        missing = [n for n, row in enumerate(candidates) if row is None]
        if missing:  # batch_generate_embeddings gives None for an image that failed
            raise ConfigurationError(
                f"candidate {missing[0]} is None (an image that failed to embed): leave "
                "failed items out"
            )
    try:
        matrix = np.asarray(candidates)
        matrix = matrix.astype(np.float64) if matrix.dtype != np.float32 else matrix
    except (TypeError, ValueError, OverflowError):  # ragged rows, text, ints over 1e308
        lengths = sorted({len(row) for row in candidates if hasattr(row, "__len__")})
        what = (
            f"lengths given: {lengths}"
            if len(lengths) > 1
            else "text, None or a number too large in a row"
        )
        raise ConfigurationError(
            f"candidate embeddings must be numbers of one length ({what})"
        ) from None
    if matrix.size == 0:
        return matrix.reshape(0, dim).astype(np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise ConfigurationError(
            f"candidate embeddings have shape {matrix.shape}, expected (n, {dim})"
        )
    return _scaled(matrix, "embeddings")


def cosine_similarities(
    query: ArrayLike, candidates: Sequence[ArrayLike] | np.ndarray
) -> np.ndarray:
    """Cosine of `query` with each candidate row."""
    try:
        if query is None:
            raise TypeError  # as an array: one NaN
        q = np.asarray(query, dtype=np.float64).ravel()
    except OverflowError:  # an int over 1e308
        raise ConfigurationError("the query embedding holds a number too large") from None
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"the query embedding must be a list of numbers, not {type(query).__name__}"
        ) from None
    if q.size == 0:
        raise ConfigurationError("the query embedding is empty")
    matrix = _matrix(candidates, q.shape[0])
    q = _scaled(q, "embeddings")
    # float32 rounding can land a hair outside [-1, 1] (1.0000001 for the same image)
    return np.clip(l2_normalize(matrix) @ l2_normalize(q[None, :])[0], -1.0, 1.0)


def cosine_similarity(a: ArrayLike, b: ArrayLike) -> float:
    if len(a) != len(b):
        raise ConfigurationError(f"the two embeddings differ in length: {len(a)} and {len(b)}")
    return float(cosine_similarities(a, [b])[0])


MAX_TOP_K = 2**63 - 1  # more than any collection holds; the largest LIMIT PostgreSQL takes


def check_top_k(k: int) -> None:
    """Refuse a top_k that asks for nothing (0, -1: an empty answer would look like no match)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:  # np.int64 too
        raise ConfigurationError(f"top_k must be a whole number of at least 1, not {k!r}")


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first (ties keep input order)."""
    k = max(0, min(k, scores.shape[0]))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    part = (
        np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
    )
    return part[np.lexsort((part, -scores[part]))]
