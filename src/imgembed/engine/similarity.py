"""Cosine similarity and top-k, vectorised with NumPy."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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


def candidate_rows(candidates: Any) -> Sequence[ArrayLike] | np.ndarray:
    """The candidates as rows that can be counted and indexed (a generator as a list); what
    holds no rows (None, a number, a text, a dict) is a ConfigurationError."""
    if isinstance(candidates, Mapping):
        raise ConfigurationError(
            "candidate embeddings must be a list or matrix of embeddings, not a "
            f"{type(candidates).__name__} (find_similar_images takes a dict of them)"
        )
    if candidates is None or isinstance(candidates, str | bytes) or not _iterable(candidates):
        raise ConfigurationError(
            "candidate embeddings must be a list or matrix of embeddings, not "
            f"{type(candidates).__name__}"
        )
    return candidates if hasattr(candidates, "__len__") else list(candidates)


def _iterable(value: Any) -> bool:
    return isinstance(value, Iterable) or hasattr(value, "__getitem__")


def not_an_embedding(row: Any) -> str | None:
    """Why a candidate row is a result of batch_generate_embeddings rather than an embedding
    (None for a failed image; a dict with include_metadata, or a failed one in debug mode)."""
    if row is None:
        return "is None (an image that failed to embed): leave failed items out"
    if isinstance(row, Mapping):
        if row.get("error"):
            return f"is a failed image's result ({row['error']}): leave failed items out"
        return "is a result dict, not an embedding: pass its 'embedding'"
    return None


def _matrix(candidates: Sequence[ArrayLike] | np.ndarray, dim: int) -> np.ndarray:
    candidates = candidate_rows(candidates)
    if not isinstance(candidates, np.ndarray):
        for n, row in enumerate(candidates):
            reason = not_an_embedding(row)
            if reason:
                raise ConfigurationError(f"candidate {n} {reason}")
    try:
        matrix = np.asarray(candidates)
        matrix = matrix.astype(np.float64) if matrix.dtype != np.float32 else matrix
    except RuntimeError as exc:  # a torch tensor that requires grad
        raise ConfigurationError(f"candidate embeddings cannot be read: {exc}") from None
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


def _vector(values: ArrayLike, what: str) -> np.ndarray:
    """One embedding as float64 numbers (flattened: a (1, d) matrix is one vector)."""
    try:
        if values is None:
            raise TypeError  # as an array: one NaN
        array = np.asarray(values, dtype=np.float64)
    except OverflowError:  # an int over 1e308
        raise ConfigurationError(f"{what} holds a number too large") from None
    except RuntimeError as exc:  # a torch tensor that requires grad
        raise ConfigurationError(f"{what} cannot be read: {exc}") from None
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"{what} must be a list of numbers, not {type(values).__name__}"
        ) from None
    if array.ndim > 1 and array.size != array.shape[-1]:  # rows, not one embedding
        raise ConfigurationError(f"{what} must be one embedding, not shape {array.shape}")
    if array.size == 0:
        raise ConfigurationError(f"{what} is empty")
    return array.ravel()


def cosine_similarities(
    query: ArrayLike, candidates: Sequence[ArrayLike] | np.ndarray
) -> np.ndarray:
    """Cosine of `query` with each candidate row."""
    q = _vector(query, "the query embedding")
    matrix = _matrix(candidates, q.shape[0])
    q = _scaled(q, "embeddings")
    # float32 rounding can land a hair outside [-1, 1] (1.0000001 for the same image)
    return np.clip(l2_normalize(matrix) @ l2_normalize(q[None, :])[0], -1.0, 1.0)


def cosine_similarity(a: ArrayLike, b: ArrayLike) -> float:
    first, second = _vector(a, "the first embedding"), _vector(b, "the second embedding")
    if first.size != second.size:
        raise ConfigurationError(
            f"the two embeddings differ in length: {first.size} and {second.size}"
        )
    return float(cosine_similarities(first, second[None, :])[0])


MAX_TOP_K = 2**63 - 1  # more than any collection holds; the largest LIMIT PostgreSQL takes


def checked_top_k(k: int) -> int:
    """Refuse a top_k that asks for nothing (0, -1: an empty answer would look like no match);
    one beyond what any store holds asks for every item (PostgreSQL's LIMIT is a bigint)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:  # np.int64 too
        raise ConfigurationError(f"top_k must be a whole number of at least 1, not {k!r}")
    return min(int(k), MAX_TOP_K)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first (ties keep input order)."""
    k = max(0, min(k, scores.shape[0]))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    if k < scores.shape[0]:
        # argpartition picks any of the scores tied with the k-th highest: the first of them
        # (in input order) are taken, as a full stable sort would
        kth = -np.partition(-scores, k - 1)[k - 1]
        above = np.flatnonzero(scores > kth)
        part = np.concatenate([above, np.flatnonzero(scores == kth)[: k - above.size]])
    else:
        part = np.arange(scores.shape[0])
    return part[np.lexsort((part, -scores[part]))]
