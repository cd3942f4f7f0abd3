"""Persistent embedding cache: (content hash, encoder fingerprint) -> raw float32 vector and
the image's quality signal (so a cached result reports what a fresh one would).

diskcache keeps it in SQLite + files, safe for many threads and processes at once.

The cache is an optimisation, so it never fails a run. Every problem is logged once per
cache and kind, then:
- a damaged database (not SQLite, malformed, a folder in its place) is renamed aside as
  `cache.db.corrupt-<time>-<pid>` (with its -wal/-shm) and an empty one takes its place;
- a damaged entry (unreadable, wrong length, not finite) is dropped and recomputed;
- a failed write (disk full, read-only) turns writing off for this cache;
- a cache that cannot be opened at all (nor rebuilt) is off for this cache's lifetime.

Other processes may hold the damaged file open while it is renamed: SQLite follows the
open file, never deletes by name the -wal/-shm of a database that was moved (it checks
before its close-time checkpoint), and every call here notices when `cache.db` is no
longer the file this cache opened, and reopens it."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import diskcache
import numpy as np

log = logging.getLogger(__name__)

DB_NAME = diskcache.core.DBNAME  # "cache.db"
QUARANTINE_MARK = ".corrupt-"
# SQLite's primary result codes for "this file is damaged" (sqlite3 errors carry them).
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
Entry = tuple[np.ndarray, dict[str, Any]]


class EmbeddingCache:
    def __init__(self, directory: Path, namespace: str):
        self.directory = Path(directory)
        self._db = self.directory / DB_NAME
        self._namespace = hashlib.sha256(namespace.encode()).hexdigest()[:16]
        self._lock = threading.RLock()  # one thread repairs; the others see the result
        self._warned: set[str] = set()
        self._writable = True
        self._cache: diskcache.Cache | None = None  # None: off
        self._inode: tuple[int, int] | None = None  # the cache.db this cache opened
        self._open()

    def _key(self, digest: str) -> str:
        return f"{self._namespace}:{digest}"

    # -- the cache's interface; none of these raises --------------------------------------

    def get(self, digest: str, dimension: int) -> Entry | None:
        """The cached vector and quality scores, or None (a miss, or an entry not usable for
        a `dimension`-d model, which is then dropped)."""
        cache = self._live()
        if cache is None:
            return None
        key = self._key(digest)
        try:
            entry = cache.get(key)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            self._failed(cache, exc)
            return None
        except Exception as exc:  # unpickling a damaged value raises anything
            self._drop(cache, key, f"cannot be read ({exc!r})")
            return None
        if entry is None:
            return None
        checked = _checked(entry, dimension)
        if isinstance(checked, str):
            self._drop(cache, key, checked)
            return None
        return checked

    def put(self, digest: str, vector: np.ndarray, quality: dict[str, Any]) -> None:
        cache = self._live()
        if cache is None or not self._writable:
            return
        raw = np.asarray(vector, dtype=np.float32).tobytes()
        try:
            cache.set(self._key(digest), (raw, quality))
        except Exception as exc:
            self._failed(cache, exc, writing=True)

    def clear(self) -> int:
        """Remove every cached embedding (of every model) and the files set aside as
        damaged; returns how many entries were removed."""
        cache = self._live()
        removed = 0
        if cache is not None:
            try:
                removed = cache.clear()
            except Exception as exc:
                self._failed(cache, exc, writing=True)
        for path in self.directory.glob(f"{DB_NAME}*{QUARANTINE_MARK}*"):
            try:
                _remove(path)
            except OSError as exc:
                self._warn("clear", f"cannot remove {path}: {exc}")
        return removed

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()

    # -- trouble ----------------------------------------------------------------------------

    def _open(self) -> None:
        """Open the cache; a damaged file is set aside once and rebuilt, anything else that
        stops it from opening leaves the cache off."""
        for attempt in range(2):
            try:
                if self._db.exists() and not self._db.is_file():  # SQLite could block on a FIFO
                    raise _NotAFileError(f"{self._db} is not a file")
                self._cache = diskcache.Cache(str(self.directory))
                self._inode = _inode(self._db)
                return
            except Exception as exc:
                self._cache = None
                damaged = attempt == 0 and _is_damage(exc, self._db)
                if damaged and self._quarantine(_inode(self._db), exc):
                    continue
                self._warn("off", f"cannot be used ({_describe(exc)}); running without it")
                return

    def _live(self) -> diskcache.Cache | None:
        """The open cache, reopened first if another process has set its file aside."""
        cache = self._cache
        if cache is not None and _inode(self._db) != self._inode:
            with self._lock:
                if self._cache is cache:
                    log.info("embedding cache %s was replaced on disk; reopening", self.directory)
                    self._open()
        return self._cache

    def _failed(self, cache: diskcache.Cache, exc: Exception, writing: bool = False) -> None:
        with self._lock:
            if self._cache is not cache:  # another thread has already dealt with it
                return
            if _inode(self._db) != self._inode:  # set aside by another process meanwhile
                self._open()
            elif _is_damage(exc, self._db):
                if self._quarantine(self._inode, exc):
                    self._open()
                else:
                    self._cache = None
                    self._warn("off", f"is damaged ({_describe(exc)}); running without it")
            elif _is_busy(exc):  # another writer held it too long: skip this one entry
                log.debug("embedding cache %s busy: %s", self.directory, exc)
            elif writing:
                self._writable = False
                self._warn("write", f"cannot be written ({_describe(exc)}); not caching more")
            else:
                self._cache = None
                self._warn("off", f"cannot be read ({_describe(exc)}); running without it")

    def _drop(self, cache: diskcache.Cache, key: str, why: str) -> None:
        self._warn("entry", f"has damaged entries (one {why}); they are dropped and recomputed")
        if self._writable:
            try:
                cache.delete(key)
            except Exception as exc:
                self._failed(cache, exc, writing=True)

    def _quarantine(self, inode: tuple[int, int] | None, exc: Exception) -> bool:
        """Rename the damaged database (and its -wal/-shm) aside; True if it is gone from
        its place. Only the file found damaged is moved: if another process has already
        replaced it, its new file stays."""
        if inode is None or _inode(self._db) != inode:
            return _inode(self._db) != inode  # gone, or replaced by someone else: reopen
        stamp = f"{QUARANTINE_MARK}{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        # The journal files first: a process opening cache.db meanwhile must not combine
        # a new database with the old journal.
        for suffix in ("-wal", "-shm", ""):
            path = self._db.with_name(DB_NAME + suffix)
            try:
                path.rename(path.with_name(path.name + stamp))
            except FileNotFoundError:
                continue
            except OSError as error:
                self._warn("off", f"is damaged ({_describe(exc)}) and cannot be moved: {error}")
                return False
        self._warn(
            "damaged",
            f"was damaged ({_describe(exc)}); moved it to {DB_NAME}{stamp} and started an "
            "empty cache",
        )
        return True

    def _warn(self, kind: str, message: str) -> None:
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
            log.warning("embedding cache %s %s%s", self.directory, message, _hint(self.directory))


def _checked(entry: Any, dimension: int) -> Entry | str:
    """The entry as (vector, quality), or why it cannot be used."""
    if not (isinstance(entry, tuple) and len(entry) == 2):
        return "is not a (vector, quality) pair"
    raw, quality = entry
    if not isinstance(raw, bytes) or len(raw) != 4 * dimension:
        size = len(raw) / 4 if isinstance(raw, bytes) else type(raw).__name__
        return f"has {size} values where the model gives {dimension}"
    vector = np.frombuffer(raw, dtype=np.float32)
    if not np.isfinite(vector).all():
        return "has non-finite values"
    confidence = quality.get("confidence") if isinstance(quality, dict) else None
    if not isinstance(confidence, float | int) or not np.isfinite(confidence):
        return "has no quality scores"
    return vector, quality


class _NotAFileError(Exception):
    pass


def _is_damage(exc: Exception, db: Path) -> bool:
    """A damaged file, as opposed to a full, read-only or busy disk (which leave it alone)."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or (db.exists() and not db.is_file())


def _is_busy(exc: Exception) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return isinstance(exc, diskcache.Timeout) or code in (_SQLITE_BUSY, _SQLITE_LOCKED)


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _hint(directory: Path) -> str:
    """What SQLite's "disk I/O error" or "unable to open" often means here."""
    folder = next((p for p in (directory, *directory.parents) if p.is_dir()), None)
    try:
        if folder is not None and not os.access(folder, os.W_OK):
            return f" ({folder} is not writable)"
        if folder is not None and shutil.disk_usage(folder).free < 1 << 20:
            return f" (the disk under {folder} is full)"
    except OSError:
        pass
    return ""


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, _NotAFileError) else f"{type(exc).__name__}: {exc}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
