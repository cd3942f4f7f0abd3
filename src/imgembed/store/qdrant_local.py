"""Qdrant's local files (qdrant-client's local mode): opened one process at a time, and what
cannot be read in them set aside (kept under `damaged/`) so that the rest opens."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import shutil
import sqlite3
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imgembed.errors import DataDirError, StoreBusyError, StoreDamagedError
from imgembed.store.qdrant_misfits import fit_settings, misfits

log = logging.getLogger(__name__)

REGISTRY = "imgembed_collections"  # the collection naming every other one's model
OPENING = "opening Qdrant"  # the action of QdrantStore's opening calls


def open_local(client: Any, path: Path) -> tuple[Any, dict[str, str]]:
    """Qdrant's local files, which one process at a time may hold (a file lock). Qdrant
    loads every collection on opening: a damaged one is set aside, so the others open; so
    are settings and points that do not fit imgembed's registry (`misfits`). Also the
    collections whose misfits cannot be set aside as their files cannot be written, each
    with why (served as they are)."""
    try:
        opened = client(path=str(path))
    except Exception as exc:
        _close_opened(exc)
        if isinstance(exc, RuntimeError):
            if "already accessed by another instance" not in str(exc):
                raise
            raise _busy(path) from None
        if _unwritable(exc):  # nothing to repair: `writable` names it
            raise
        with _locked(path):
            repaired = _set_meta_aside(path) or _set_aside_damaged(path)
        if not repaired:
            raise
        return open_local(client, path)
    settings, points = misfits(opened, REGISTRY)
    stuck = _unwritable_misfits(path, settings, points)
    if not {*settings, *points} - set(stuck):
        for why in stuck.values():
            log.warning("%s; till then it is served as it is", why)
        return opened, stuck
    opened.close()
    settings = {name: size for name, size in settings.items() if name not in stuck}
    points = [name for name in points if name not in stuck]
    with _locked(path):  # the registry's length set, then the points not of it set aside
        if not (fit_settings(path, settings) + _set_aside_damaged(path, points)):  # or again
            raise StoreDamagedError(
                f"Qdrant's local collections {', '.join(map(repr, sorted(points)))} hold "
                f"vectors that do not fit their settings in {path / 'meta.json'}: move their "
                f"folders out of {path / 'collection'} and index into them again"
            )
    return open_local(client, path)


def _unwritable_misfits(path: Path, settings: dict[str, int], points: list[str]) -> dict[str, str]:
    """The misfit collections whose files cannot be written to mend them (a read-only mount,
    another user's files), each with what does not fit and what to do: nothing of them is
    changed, so the others still open."""
    stuck = {}
    for name in {*settings, *points}:
        folder = path / "collection" / name
        aside = path / "damaged" if (path / "damaged").exists() else path
        needed = [path, path / "meta.json"] if name in settings else []
        needed += [folder, folder / "storage.sqlite", aside] if name in points else [aside]
        if (refused := next((p for p in needed if not os.access(p, os.W_OK)), None)) is None:
            continue
        read_only = os.statvfs(refused).f_flag & os.ST_RDONLY
        what = (
            "holds vectors that do not fit it, which could not be taken out"
            if name in points
            else f"has settings that name another vector length than imgembed's registry "
            f"({settings[name]}), which could not be set to it"
        )
        stuck[name] = (
            f"Qdrant's local collection {name!r} {what}, as {refused} cannot be written "
            f"({'a read-only file system' if read_only else 'permission denied'}): make it "
            "writable for this user and open Qdrant again, which mends it"
        )
    return stuck


def _close_opened(exc: BaseException) -> None:
    """Close the files of the client whose opening failed (`exc`): qdrant-client leaves its
    SQLite connections and lock file to the garbage collector, which frees them only when
    it next runs (a reference cycle), so every failed opening held them meanwhile (a
    server asked while another process holds the folder opens it again each request)."""
    from qdrant_client.local.local_collection import LocalCollection
    from qdrant_client.local.persistence import CollectionPersistence
    from qdrant_client.local.qdrant_local import QdrantLocal

    opened = (QdrantLocal, LocalCollection, CollectionPersistence)
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if isinstance(owner := frame.f_locals.get("self"), opened):
            with contextlib.suppress(Exception):  # half made: close what is there
                owner.close()


@contextlib.contextmanager
def writable(path: Path, action: str) -> Iterator[None]:
    """A write refused in Qdrant's local folder (a read-only mount, a folder or file this
    user cannot write) as the DataDirError naming it: the operator's to fix, not to retry.
    Reads go on where the client could open the folder (it writes its lock file there)."""
    try:
        yield
    except Exception as exc:
        if (why := _unwritable(exc)) is None:
            raise
        raise DataDirError(
            f"Qdrant's local folder {path} {why}: {action} failed"
            + (" (qdrant-client writes there on opening, even to search)" if action == OPENING
               else " (searches and listings still work)")
            + "; make it writable for this user, or set IMGEMBED_DATA_DIR to a folder "
            "you can write"
        ) from exc  # fmt: skip


def _unwritable(exc: BaseException) -> str | None:
    """What in the folder refused the work, or None for any other error."""
    at = f" at {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return f"cannot be written (a read-only file system{at})"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot be written or read by this user (permission denied{at})"
    if isinstance(exc, sqlite3.OperationalError) and "readonly database" in str(exc):
        return "cannot be written (a collection's file is read-only: SQLite's \"attempt to " \
               "write a readonly database\")"  # fmt: skip
    return None


def missing_files(path: Path) -> dict[str, Path]:
    """The collections meta.json lists whose files are gone, each with what is missing (its
    folder, or its storage.sqlite): looked at before the client opens, which makes them
    anew, empty, without a word. Nothing for a meta.json it cannot read (set aside)."""
    try:
        names = list(json.loads((path / "meta.json").read_text())["collections"])
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    missing = {}
    for name in names:
        folder = path / "collection" / name
        if not (folder / "storage.sqlite").exists():
            missing[name] = folder if not folder.exists() else folder / "storage.sqlite"
    return missing


def warn_missing(path: Path, name: str, missing: Path, provenance: Any) -> None:
    """A collection imgembed's registry names (`provenance`: its model) that started empty
    as its files were gone: served, so that every other collection is too, and said."""
    log.warning(
        "Qdrant's local collection %r (%s) is listed in %s, but %s is missing: the items "
        "stored in it are not there (the registry keeps no count of them), and it starts "
        "empty, its files made anew; if they were moved, stop imgembed and put them back in "
        "place of the new ones, or else index into it again",
        name, provenance.describe(), path / "meta.json", missing,
    )  # fmt: skip


def _busy(path: Path) -> StoreBusyError:
    return StoreBusyError(
        f"{path} is open in another imgembed process (Qdrant's local files serve one "
        "process at a time, searches too): wait for it to finish and run again, or use a "
        "Qdrant server (IMGEMBED_QDRANT_URL) for work at the same time"
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Qdrant's own lock on its folder, held while imgembed repairs files in it."""
    import portalocker

    with open(path / ".lock", "a+") as lock:
        try:
            portalocker.lock(
                lock, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING
            )
        except portalocker.exceptions.LockException:
            raise _busy(path) from None
        yield


def _set_meta_aside(path: Path) -> bool:
    """Move a meta.json the client cannot read to `damaged/` (kept): the client starts a new
    one, and the collections imgembed's registry names are listed again from their files
    (`QdrantStore._list_again`); whether it was moved."""
    meta = path / "meta.json"
    if (why := _meta_problem(meta)) is None:
        return False
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path / "damaged" / f"meta-{stamp}.json"
    try:
        target.parent.mkdir(exist_ok=True)
        meta.rename(target)
    except OSError as exc:
        raise StoreDamagedError(
            f"Qdrant's local list of collections {meta} is damaged ({why}) and cannot be "
            f"moved to {target} ({exc.strerror or exc}): restore it from a backup, or move it "
            "away (the collections are listed again from their files)"
        ) from None
    log.warning(
        "Qdrant's local list of collections %s is damaged (%s): moved to %s, kept there; "
        "the collections are listed again from their files", meta, why, target,
    )  # fmt: skip
    return True


def _meta_problem(meta: Path) -> str | None:
    """Why qdrant-client cannot read its meta.json (the settings of every collection), or
    None; checked as the client reads it."""
    try:
        text = meta.read_text()
        listed = json.loads(text) if text.strip() else None
        if not isinstance(listed, dict):
            return "not an object" if text.strip() else "empty"
        if missing := [
            k for k in ("collections", "aliases") if not isinstance(listed.get(k), dict)
        ]:
            return f"no {missing[0]!r} in it"
        for name, config in listed["collections"].items():
            try:
                _settings(config)
            except (ValueError, TypeError, AttributeError):
                return f"collection {name!r}: settings it cannot read"
    except FileNotFoundError:
        return None  # the client makes it
    except OSError as exc:
        return exc.strerror or str(exc)
    except ValueError as exc:
        return str(exc)
    return None


def _set_aside_damaged(path: Path, only: list[str] | None = None) -> list[str]:
    """Move each collection (of `only`, if given) whose file SQLite cannot read to `damaged/`
    (kept, not deleted; the collection starts empty), and take the points qdrant-client
    cannot load out of the others (a copy of the file as it was kept there); the names.
    Under `_locked`."""
    meta = path / "meta.json"
    if not meta.is_file():  # the client failed before making it: nothing of ours to repair
        return []
    repaired = []
    for name, config in json.loads(meta.read_text())["collections"].items():
        if only is not None and name not in only:
            continue
        folder = path / "collection" / name
        storage = folder / "storage.sqlite"
        problem = _unreadable(storage)
        lost, stored, why = ([], 0, "") if problem else _unreadable_points(storage, config)
        if problem is None and not lost:
            continue
        if name == REGISTRY:  # it names every collection's model: never started afresh
            problem = problem or f"{len(lost)} of its {stored} points cannot be read: {why}"
            raise StoreDamagedError(
                f"Qdrant's local registry of collections {folder} is damaged ({problem}): "
                f"restore it from a backup, or move {path} away and index again"
            )
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = path / "damaged" / f"{name}-{stamp}"
        target.parent.mkdir(exist_ok=True)
        if problem is not None:
            folder.rename(target)
            log.warning(
                "Qdrant's local collection %r is damaged (%s): moved to %s, kept there; "
                "the collection starts empty: index into it again", name, problem, target,
            )  # fmt: skip
        else:
            target.mkdir()
            shutil.copy2(storage, target / storage.name)
            with contextlib.closing(sqlite3.connect(storage)) as db, db:
                db.executemany("DELETE FROM points WHERE rowid = ?", [(r,) for r in lost])
            log.warning(
                "%d of the %d items stored in Qdrant's local collection %r cannot be read "
                "(%s): taken out of %s, the file as it was kept in %s; %s",
                len(lost), stored, name, why, storage, target,
                "the collection is empty now: index into it again" if len(lost) == stored
                else "the other items are there: index again to store those anew",
            )  # fmt: skip
        repaired.append(name)
    return repaired


def _unreadable_points(storage: Path, config: dict[str, Any]) -> tuple[list[int], int, str]:
    """The rows of the points qdrant-client cannot load (each a pickled PointStruct, whose
    vectors must fit the collection's settings `config`, as meta.json holds them), how many
    rows there are, and why the first cannot be loaded."""
    lost: list[int] = []
    stored, why = 0, ""
    if not storage.exists():
        return lost, stored, why
    fits = _point_check(config)
    with contextlib.closing(sqlite3.connect(f"file:{storage}?mode=ro", uri=True)) as db:
        try:
            for rowid, value in db.execute("SELECT rowid, point FROM points"):
                stored += 1
                if problem := fits(value):
                    lost.append(rowid)
                    why = why or problem
        except sqlite3.Error:  # no table yet: the client makes it
            pass
    return lost, stored, why


def _point_check(config: dict[str, Any]) -> Callable[[bytes], str | None]:
    """Why qdrant-client cannot load a stored point into the collection of these settings,
    or None: bytes that unpickle to no point, or vectors it refuses (another length than the
    collection's, NaN), checked by the client's own test of a point before it is written;
    also none at all, or an infinity, which it passes and loads but cannot search."""
    from qdrant_client.http.models import PointStruct, VectorParams
    from qdrant_client.local.local_collection import LocalCollection

    settings = _settings(config)
    empty = LocalCollection(settings)  # in memory
    # clients without that test refuse such a point on writing it to a collection in memory
    check = getattr(empty, "_validate_point", None) or (lambda point: empty.upsert([point]))
    unnamed = isinstance(settings.vectors, VectorParams)  # imgembed's: one vector, no name

    def problem(value: bytes) -> str | None:
        try:
            point = pickle.loads(value)
            if not isinstance(point, PointStruct):
                return f"a {type(point).__name__}, not a point"
            if unnamed and point.vector == {}:  # the test passes it: no name it lacks
                return "a point without a vector"
            check(point)
            vector = point.vector.get("") if isinstance(point.vector, dict) else point.vector
            if unnamed and not np.isfinite(np.asarray(vector, dtype=float)).all():
                return "a vector holding an infinite value"  # the test passes it: NaN scores
        except Exception as exc:  # damaged bytes fail in any way unpickling can
            return f"{type(exc).__name__}: {exc}"
        return None

    return problem


def _settings(config: dict[str, Any]) -> Any:
    """A collection's settings as meta.json holds them, read as the client reads them."""
    from qdrant_client.http.models import CreateCollection

    # the client drops this field of old versions before reading
    return CreateCollection(**{k: v for k, v in config.items() if k != "init_from"})


def _unreadable(storage: Path) -> str | None:
    """Why SQLite cannot read the file, or None (also for a file not there yet). A file this
    user may not read or write is not damaged: that is raised (`writable` names it)."""
    if not storage.exists():
        return None
    if not os.access(storage, os.R_OK | os.W_OK):
        raise PermissionError(errno.EACCES, "permission denied", str(storage))
    try:
        with contextlib.closing(sqlite3.connect(f"file:{storage}?mode=ro", uri=True)) as db:
            (answer,) = db.execute("PRAGMA quick_check").fetchone()
    except sqlite3.Error as exc:
        return str(exc)
    return None if answer == "ok" else answer
