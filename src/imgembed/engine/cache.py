"""Persistent embedding cache: (content hash, encoder fingerprint) -> raw float32 vector and
the image's quality signal (so a cached result reports what a fresh one would).

diskcache keeps it in SQLite + files, safe for many threads and processes at once."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import diskcache
import numpy as np


class EmbeddingCache:
    def __init__(self, directory: Path, namespace: str):
        self.directory = Path(directory)
        self._namespace = hashlib.sha256(namespace.encode()).hexdigest()[:16]
        self._cache = diskcache.Cache(str(self.directory))

    def _key(self, digest: str) -> str:
        return f"{self._namespace}:{digest}"

    def get(self, digest: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        entry = self._cache.get(self._key(digest))
        if entry is None:
            return None
        raw, quality = entry
        return np.frombuffer(raw, dtype=np.float32), quality

    def put(self, digest: str, vector: np.ndarray, quality: dict[str, Any]) -> None:
        raw = np.asarray(vector, dtype=np.float32).tobytes()
        self._cache.set(self._key(digest), (raw, quality))

    def clear(self) -> int:
        """Remove every cached embedding (of every model); returns how many."""
        return self._cache.clear()

    def close(self) -> None:
        self._cache.close()
