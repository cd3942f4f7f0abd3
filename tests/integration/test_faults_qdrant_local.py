"""Damaged files in Qdrant's local mode (qdrant-client's own files under the data directory,
no server): its list of collections (meta.json) and a collection's points (storage.sqlite,
one pickled point per row). Real files, the real client."""

import contextlib
import gc
import json
import logging
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from imgembed.errors import (
    DataDirError,
    StoreBusyError,
    StoreDamagedError,
    StoreUnavailableError,
)
from imgembed.store import Provenance, Record
from imgembed.store.qdrant import QdrantStore
from tests.cli import run

PROV = Provenance("imgembed-tiny", "seed:0", 8, "abc123")


def _unit(rng) -> np.ndarray:
    vector = rng.normal(size=8).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _two_collections(folder: Path) -> None:
    """'kept' and 'hurt', five items each, closed again."""
    rng = np.random.default_rng(0)
    store = QdrantStore(path=folder)
    for name in ("kept", "hurt"):
        store.create_collection(name, PROV)
        store.upsert(name, [Record(f"{name}-{i}", _unit(rng), f"h{i}", "s") for i in range(5)])
    store.close()


def _cut(meta: Path) -> None:
    meta.write_text(meta.read_text()[:40])


def _directory(meta: Path) -> None:  # unreadable even to root, unlike chmod 000
    meta.unlink()
    meta.mkdir()


DAMAGED_META = {
    "cut short": (_cut, "Expecting"),
    "empty": (lambda meta: meta.write_text(""), "empty"),
    "not JSON": (lambda meta: meta.write_bytes(b"\x00\x01garbage"), "Expecting value"),
    "a list": (lambda meta: meta.write_text("[1, 2]"), "not an object"),
    "no collections": (lambda meta: meta.write_text('{"aliases": {}}'), "no 'collections'"),
    "no aliases": (lambda meta: meta.write_text('{"collections": {}}'), "no 'aliases'"),
    "a config that is no config": (
        lambda meta: meta.write_text('{"collections": {"hurt": {"vectors": "x"}}, "aliases": {}}'),
        "collection 'hurt': settings it cannot read",
    ),
    "a folder": (_directory, "Is a directory"),
}


@pytest.mark.parametrize("damage", DAMAGED_META.values(), ids=DAMAGED_META.keys())
def test_a_damaged_local_qdrant_meta_json_is_set_aside_and_every_collection_open(
    tmp_path, caplog, damage
):
    """qdrant-client's list of its collections cut short, emptied or not JSON was a bare
    StoreError quoting the JSON parser, naming the folder but not the file. It is moved to
    damaged/ (kept), and every collection imgembed's registry names opens from its files."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    spoil, why = damage
    spoil(folder / "meta.json")

    with caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant"):
        store = QdrantStore(path=folder)
    try:
        assert [(c.name, c.count) for c in store.collections()] == [("hurt", 5), ("kept", 5)]
        assert store.search("kept", _unit(np.random.default_rng(2)))[0].id.startswith("kept-")
    finally:
        store.close()
    (aside,) = (folder / "damaged").iterdir()
    assert aside.name.startswith("meta-") and aside.name.endswith(".json")
    assert f"Qdrant's local list of collections {folder / 'meta.json'} is damaged (" in caplog.text
    assert f"{why}" in caplog.text and f"moved to {aside}, kept there" in caplog.text
    QdrantStore(path=folder).close()  # opens as it is now, without a word


def test_a_damaged_local_qdrant_meta_json_that_cannot_be_moved_is_named(tmp_path):
    """Where it cannot be set aside, a StoreUnavailableError names it and what to do."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    _cut(folder / "meta.json")
    (folder / "damaged").write_text("a file where the folder belongs")
    with pytest.raises(StoreUnavailableError) as caught:
        QdrantStore(path=folder)
    message = str(caught.value)
    assert message.startswith(f"Qdrant's local list of collections {folder / 'meta.json'} ")
    assert "is damaged (Expecting value" in message and "cannot be moved to" in message
    assert message.endswith("restore it from a backup, or move it away (the collections are "
                            "listed again from their files)")  # fmt: skip


def _first_row(storage: Path, value: bytes) -> bytes:
    """Put `value` in place of the first stored point; the file's bytes now."""
    with contextlib.closing(sqlite3.connect(storage)) as db, db:
        db.execute("UPDATE points SET point = ? WHERE rowid = (SELECT min(rowid) FROM points)",
                   (value,))  # fmt: skip
    return storage.read_bytes()


def _point(size: int) -> bytes:
    """A point as the client stores it, its vector of `size` numbers (written by another
    tool, or another model's, to a collection of 8)."""
    from qdrant_client.http.models import PointStruct

    payload = {"id": "other", "content_hash": "h", "source": "s", "metadata": {}}
    return pickle.dumps(PointStruct(id=str(uuid.uuid4()), vector=[0.5] * size, payload=payload))


DAMAGED_POINTS = {
    "not a pickle": (b"garbage", "UnpicklingError"),
    "a pickle cut short": (pickle.dumps(list(range(100)))[:30], "UnpicklingError"),
    "another object pickled": (pickle.dumps(42), "a int, not a point"),
    "a vector of another length": (_point(3), "Vector dimension error: expected dim: 8, got 3"),
}


@pytest.mark.parametrize("damage", DAMAGED_POINTS.values(), ids=DAMAGED_POINTS.keys())
def test_an_unreadable_local_qdrant_point_is_taken_out_and_the_rest_open(tmp_path, caplog, damage):
    """qdrant-client's local mode unpickles every point of every collection on opening: one
    damaged row failed the whole store (StoreError "UnpicklingError: pickle data was
    truncated", naming neither collection nor file; a vector of another length: "ValueError:
    setting an array element with a sequence"). It is taken out of its file (a copy of the
    file as it was kept in damaged/), and every other item of every collection is there."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    storage = folder / "collection" / "hurt" / "storage.sqlite"
    value, why = damage
    damaged = _first_row(storage, value)

    with caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant"):
        store = QdrantStore(path=folder)
    try:
        assert store.count("kept") == 5 and store.count("hurt") == 4
        assert [c.name for c in store.collections()] == ["hurt", "kept"]
        (aside,) = (folder / "damaged").iterdir()
        assert aside.name.startswith("hurt-") and (aside / "storage.sqlite").read_bytes() == damaged
        assert "1 of the 5 items stored in Qdrant's local collection 'hurt'" in caplog.text
        assert why in caplog.text
        assert f"taken out of {storage}, the file as it was kept in {aside}" in caplog.text
        stored = store.hashes("hurt")
        missing = {f"hurt-{i}" for i in range(5)} - set(stored)
        rng = np.random.default_rng(1)
        store.upsert("hurt", [Record(i, _unit(rng), "h", "s") for i in missing])  # indexed again
        assert sorted(store.hashes("hurt")) == [f"hurt-{i}" for i in range(5)]
    finally:
        store.close()
    QdrantStore(path=folder).close()  # opens as it is now, without a word
    assert len(list((folder / "damaged").iterdir())) == 1


def _every_point(storage: Path, change) -> bytes:
    """Each stored point's vector as `change` makes it; the file's bytes now."""
    with contextlib.closing(sqlite3.connect(storage)) as db, db:
        for rowid, value in db.execute("SELECT rowid, point FROM points").fetchall():
            point = pickle.loads(value)
            point.vector = change(point.vector)
            db.execute("UPDATE points SET point = ? WHERE rowid = ?", (pickle.dumps(point), rowid))
    return storage.read_bytes()


MISFIT_POINTS = {
    "vectors of another length": (
        lambda v: v[:3],
        "Vector dimension error: expected dim: 8, got 3",
    ),
    "only a named vector": (lambda v: {"image": v}, "Not existing vector name error: image"),
}


@pytest.mark.parametrize("misfit", MISFIT_POINTS.values(), ids=MISFIT_POINTS.keys())
def test_local_qdrant_points_that_all_misfit_their_settings_are_taken_out(tmp_path, caplog, misfit):
    """Every point of a collection holding vectors its settings do not name (3 numbers where
    meta.json and the registry say 8: another model's, another tool's): qdrant-client loads
    them as one array without a word, so it opened, and every search of it failed (StoreError
    "shapes (5,3) and (8,) not aligned"), as did storing ("could not broadcast"); named vectors
    were counted (5) but no search found them. As one such point already is, they are taken
    out of the file (kept in damaged/), and the collection serves, empty, to be indexed again;
    the other collection is whole."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    storage = folder / "collection" / "hurt" / "storage.sqlite"
    change, why = misfit
    damaged = _every_point(storage, change)

    with caplog.at_level(logging.WARNING):
        store = QdrantStore(path=folder)
    rng = np.random.default_rng(1)
    try:
        assert [(c.name, c.count) for c in store.collections()] == [("hurt", 0), ("kept", 5)]
        assert store.search("kept", _unit(rng))[0].id.startswith("kept-")
        assert store.search("hurt", _unit(rng)) == []
        (aside,) = (folder / "damaged").iterdir()
        assert aside.name.startswith("hurt-") and (aside / "storage.sqlite").read_bytes() == damaged
        assert "5 of the 5 items stored in Qdrant's local collection 'hurt' cannot be read" in (
            caplog.text
        )
        assert why in caplog.text and f"the file as it was kept in {aside}" in caplog.text
        assert "the collection is empty now: index into it again" in caplog.text
        store.upsert("hurt", [Record(f"hurt-{i}", _unit(rng), "h", "s") for i in range(5)])
        found = sorted(h.id for h in store.search("hurt", _unit(rng), top_k=9))
        assert found == [f"hurt-{i}" for i in range(5)]
    finally:
        store.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        QdrantStore(path=folder).close()  # opens as it is now, without a word
    assert caplog.text == ""


def _rewrite(folder: Path, item: str, vector) -> None:
    """Store `item` of 'hurt' again with `vector`, written by qdrant-client's own persistence,
    which checks nothing (an older client, or another tool, wrote such points)."""
    from qdrant_client.local.persistence import CollectionPersistence

    files = CollectionPersistence(str(folder / "collection" / "hurt"))
    try:
        (point,) = [p for p in files.load() if p.payload["id"] == item]
        point.vector = vector(point.vector)
        files.persist(point)
    finally:
        files.close()


SOME_MISFIT = {
    "only a named vector": (lambda v: {"image": v}, "Not existing vector name error: image"),
    "NaN": (lambda v: [float("nan"), *v[1:]], "Vector contains NaN values"),
    "another length": (lambda v: v[:3], "expected dim: 8, got 3"),
    # no vector at all: the whole opening failed, every collection with it
    "no vector": (lambda v: {}, "a point without a vector"),
    # not a number (null): the opening's check failed, the whole opening with it (TypeError)
    "null": (lambda v: [None, *v[1:]], "Vector contains NaN values"),
    # an infinity passes the client's test: it scored NaN, ranked first in every search
    "infinity": (lambda v: [float("inf"), *v[1:]], "a vector holding an infinite value"),
}


@pytest.mark.parametrize("misfit", SOME_MISFIT.values(), ids=SOME_MISFIT.keys())
def test_a_local_qdrant_point_among_fitting_ones_that_misfits_is_taken_out(
    tmp_path, caplog, misfit
):
    """One point of a collection misfitting its settings, the others fine: the check of one
    point per collection missed it (another length fails the client's loading, so was taken
    out already). A named vector opened without a word and was counted but
    never found, and indexing skipped its image as unchanged, so it stayed unfound; a NaN
    ranked first in every search of the collection (score -1.0 over HTTP and the CLI). It is
    taken out as a single damaged point is (the file as it was kept in damaged/, a warning),
    so indexing stores it anew; the other items stay."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    change, why = misfit
    _rewrite(folder, "hurt-2", change)

    with caplog.at_level(logging.WARNING):
        store = QdrantStore(path=folder)
    rng = np.random.default_rng(1)
    try:
        assert [(c.name, c.count) for c in store.collections()] == [("hurt", 4), ("kept", 5)]
        assert sorted(store.hashes("hurt")) == ["hurt-0", "hurt-1", "hurt-3", "hurt-4"]
        assert "1 of the 5 items stored in Qdrant's local collection 'hurt' cannot be read" in (
            caplog.text
        )
        assert why in caplog.text and "the other items are there" in caplog.text
        (aside,) = (folder / "damaged").iterdir()
        assert aside.name.startswith("hurt-")
        store.upsert("hurt", [Record("hurt-2", _unit(rng), "h", "s")])  # indexed again
        hits = store.search("hurt", _unit(rng), top_k=9)
        assert sorted(h.id for h in hits) == [f"hurt-{i}" for i in range(5)]
        assert all(-1.0 <= h.score <= 1.0 for h in hits)
    finally:
        store.close()


def test_local_qdrant_settings_the_points_and_registry_contradict_are_set_right(tmp_path, caplog):
    """meta.json saying vectors of 3 numbers where the collection's points and imgembed's
    registry (its model) hold 8 (a meta.json restored from before the collection was made
    again with another model): it opened, searched, but storing failed ("Vector dimension
    error: expected dim: 3, got 8"). The settings are what is wrong, so they are set to 8
    (meta.json as it was kept in damaged/), and every item stays."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    meta = folder / "meta.json"
    listed = json.loads(meta.read_text())
    listed["collections"]["hurt"]["vectors"]["size"] = 3
    meta.write_text(json.dumps(listed))
    was = meta.read_bytes()

    with caplog.at_level(logging.WARNING):
        store = QdrantStore(path=folder)
    rng = np.random.default_rng(1)
    try:
        assert [(c.name, c.count) for c in store.collections()] == [("hurt", 5), ("kept", 5)]
        store.upsert("hurt", [Record("hurt-9", _unit(rng), "h", "s")])
        assert store.count("hurt") == 6 and len(store.search("hurt", _unit(rng))) == 6
    finally:
        store.close()
    (kept,) = (folder / "damaged").iterdir()
    assert kept.name.startswith("meta-") and kept.read_bytes() == was
    assert (
        f"Qdrant's local collection 'hurt': its settings in {meta} say vectors of 3 numbers, "
        "but imgembed's registry of collections names 8 (its model's), so it could not be "
        f"searched or stored into: the settings are set to 8, meta.json as it was kept in {kept}"
    ) in caplog.text
    assert "cannot be read" not in caplog.text  # the items fit the registry: they stay
    assert json.loads(meta.read_text())["collections"]["hurt"]["vectors"]["size"] == 8


def test_a_local_qdrant_collection_the_registry_contradicts_is_made_its_models(tmp_path, caplog):
    """imgembed's registry naming vectors of 3 numbers (its model's) for a collection whose
    settings and items hold 8 (a registry restored from before it was made again, or the
    folder of another store's collection put in its place): every search of it failed, with
    a query of 8 numbers as "vector of shape (8,), but the collection has 3 dimensions", with
    one of 3 as StoreError "shapes (5,8) and (3,) not aligned". The registry is the only
    record of which model made a collection's vectors, so its length stands: the settings
    are set to it and the items of another length taken out (kept in damaged/); the
    collection serves its model, empty, to be indexed again."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    registry = folder / "collection" / "imgembed_collections" / "storage.sqlite"
    with contextlib.closing(sqlite3.connect(registry)) as db, db:
        for rowid, value in db.execute("SELECT rowid, point FROM points").fetchall():
            entry = pickle.loads(value)
            if entry.payload["name"] == "hurt":
                entry.payload["dimension"] = 3
                db.execute("UPDATE points SET point = ? WHERE rowid = ?",
                           (pickle.dumps(entry), rowid))  # fmt: skip

    with caplog.at_level(logging.WARNING):
        store = QdrantStore(path=folder)
    rng = np.random.default_rng(1)
    short = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    try:
        assert [(c.name, c.count) for c in store.collections()] == [("hurt", 0), ("kept", 5)]
        assert store.search("kept", _unit(rng))[0].id.startswith("kept-")
        store.upsert("hurt", [Record("hurt-9", short, "h", "s")])
        assert [h.id for h in store.search("hurt", short)] == ["hurt-9"]
    finally:
        store.close()
    assert "say vectors of 8 numbers, but imgembed's registry of collections names 3" in (
        caplog.text
    )
    assert "5 of the 5 items stored in Qdrant's local collection 'hurt' cannot be read" in (
        caplog.text
    )
    assert "expected dim: 3, got 8" in caplog.text
    assert sorted(p.name.split("-")[0] for p in (folder / "damaged").iterdir()) == [
        "hurt", "meta"]  # fmt: skip


def test_an_unreadable_point_of_the_local_qdrant_registry_is_named_with_what_to_do(tmp_path):
    """The registry holds every collection's model: a row of it is not taken out silently."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    registry = folder / "collection" / "imgembed_collections" / "storage.sqlite"
    damaged = _first_row(registry, b"garbage")
    with pytest.raises(StoreDamagedError) as caught:
        QdrantStore(path=folder)
    assert str(caught.value) == (
        f"Qdrant's local registry of collections {registry.parent} is damaged (1 of its 2 "
        "points cannot be read: UnpicklingError: pickle data was truncated): restore it "
        f"from a backup, or move {folder} away and index again"
    )
    assert registry.read_bytes() == damaged and not (folder / "damaged").exists()


def _not_a_database(storage: Path) -> None:
    storage.write_bytes(b"not a database" + storage.read_bytes()[14:])


def _cut_short(storage: Path) -> None:
    storage.write_bytes(storage.read_bytes()[:5000])


def _folder(storage: Path) -> None:
    storage.unlink()
    storage.mkdir()


DAMAGED_FILES = {"not a database": _not_a_database, "cut short": _cut_short, "a folder": _folder}


@pytest.mark.parametrize("spoil", DAMAGED_FILES.values(), ids=DAMAGED_FILES.keys())
def test_a_damaged_local_qdrant_sqlite_file_is_set_aside_and_the_others_open(tmp_path, spoil):
    """The collection's file itself (not one row): the whole folder goes to damaged/, the
    collection starts empty and the others are all there."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    spoil(folder / "collection" / "hurt" / "storage.sqlite")
    store = QdrantStore(path=folder)
    try:
        assert store.count("kept") == 5 and store.count("hurt") == 0
        (aside,) = (folder / "damaged").iterdir()
        assert aside.name.startswith("hurt-") and (aside / "storage.sqlite").exists()
    finally:
        store.close()


def test_a_local_qdrant_collection_meta_json_lost_is_listed_again(tmp_path, caplog):
    """A meta.json restored from an older backup (as the error above advises) lacks the
    collections made since: their files were there, yet each call said "it was dropped ...;
    what was stored in it is gone too" and the list left them out. The registry still names
    their model, so they are listed again with every item."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["collections"]["hurt"]
    (folder / "meta.json").write_text(json.dumps(meta))

    with caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant"):
        store = QdrantStore(path=folder)
    try:
        assert [(c.name, c.count) for c in store.collections()] == [("hurt", 5), ("kept", 5)]
        assert sorted(store.hashes("hurt")) == [f"hurt-{i}" for i in range(5)]
        assert (
            f"Qdrant's local collection 'hurt' was not listed in {folder / 'meta.json'}, though "
            f"its files are in {folder / 'collection' / 'hurt'}: listed again" in caplog.text
        )
    finally:
        store.close()
    assert "hurt" in json.loads((folder / "meta.json").read_text())["collections"]


@pytest.mark.parametrize("lost", ["the folder", "storage.sqlite"])
def test_a_local_qdrant_collection_whose_files_are_gone_is_named(tmp_path, caplog, lost):
    """A collection meta.json lists whose folder (or file) is gone started empty without a
    word: the client makes its files anew. Its loss is named once, with its model (what the
    registry knows) and what to do; it is served empty, like every other collection in full
    (its files are gone already: holding the others back would keep nothing, and indexing
    into it again is what mends it)."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    hurt = folder / "collection" / "hurt"
    if lost == "the folder":
        shutil.rmtree(missing := hurt)
    else:
        (missing := hurt / "storage.sqlite").unlink()

    with caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant"):
        store = QdrantStore(path=folder)
    try:
        assert [(c.name, c.count) for c in store.collections()] == [("hurt", 0), ("kept", 5)]
        assert (
            f"Qdrant's local collection 'hurt' ({PROV.describe()}) is listed in "
            f"{folder / 'meta.json'}, but {missing} is missing: the items stored in it are not "
            "there" in caplog.text
        )
        assert "index into it again" in caplog.text
        store.upsert("hurt", [Record("hurt-0", _unit(np.random.default_rng(1)), "h", "s")])
    finally:
        store.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant"):
        QdrantStore(path=folder).close()  # said once: what is there now is what was indexed
    assert caplog.text == ""


def test_local_qdrant_collections_the_registry_lost_are_named(tmp_path, caplog):
    """imgembed's registry (which names each collection's model) gone or emptied: the list
    showed nothing and searches said "no collection", while the items were all there,
    without a word. The collections that hold items are named, with what to do."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    registry = folder / "collection" / "imgembed_collections"
    shutil.rmtree(registry)

    with caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant"):
        store = QdrantStore(path=folder)
    try:
        assert store.collections() == []
        assert (
            f"Qdrant's local collections 'hurt', 'kept' hold items, but imgembed's registry of "
            f"collections {registry} does not name them" in caplog.text
        )
        assert "index into each again with its model (what is stored stays)" in caplog.text
        store.create_collection("kept", PROV)  # what `index` does first
        assert [(c.name, c.count) for c in store.collections()] == [("kept", 5)]
    finally:
        store.close()


UNREAD_ENTRIES = {
    "no name": (lambda entry: entry.pop("name"), "no 'name'"),
    "a name not text": (lambda entry: entry.update(name=7), "its 'name' is not text: 7"),
    # the opening's check of vector lengths failed on it: "TypeError: unhashable type: 'list'"
    "a name a list": (
        lambda entry: entry.update(name=["hurt"]),
        "its 'name' is not text: ['hurt']",
    ),
    "no dimension": (lambda entry: entry.pop("dimension"), "no 'dimension'"),
    "a dimension true": (  # Python's bool is an int: it passed as a length of 1
        lambda entry: entry.update(dimension=True),
        "its 'dimension' is not a whole number: True",
    ),
}


@pytest.mark.parametrize("spoil", UNREAD_ENTRIES.values(), ids=UNREAD_ENTRIES.keys())
def test_a_registry_entry_it_cannot_read_is_named_and_the_rest_serves(tmp_path, caplog, spoil):
    """A registry entry without a 'name' (written by hand, or by another tool) failed every
    opening (StoreError "opening Qdrant failed (...): KeyError: 'name'"), one whose name was
    no text too ("TypeError: unsupported operand type(s) for /"); one without 'dimension'
    failed every listing. As for a collection the registry does not name, that collection
    is not listed, a warning names the registry's file, the entry, why and what to do, and
    the rest serves; indexing into it again writes the entry anew, its items kept."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    registry = folder / "collection" / "imgembed_collections"
    change, why = spoil
    with contextlib.closing(sqlite3.connect(registry / "storage.sqlite")) as db, db:
        for rowid, value in db.execute("SELECT rowid, point FROM points").fetchall():
            if (entry := pickle.loads(value)).payload["name"] == "hurt":
                change(entry.payload)
                db.execute("UPDATE points SET point = ? WHERE rowid = ?",
                           (pickle.dumps(entry), rowid))  # fmt: skip
                point_id = entry.id

    with caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant"):
        store = QdrantStore(path=folder)
    try:
        assert [(c.name, c.count) for c in store.collections()] == [("kept", 5)]
        assert (
            f"imgembed's registry of collections {registry} holds an entry it cannot read "
            f"(point {point_id}: {why}), that of collection 'hurt', so that collection is not "
            "listed: index into it again with its model, which writes the entry anew"
        ) in caplog.text
        assert "does not name them" not in caplog.text  # said once
        store.create_collection("hurt", PROV)  # what `index` does first
        assert [(c.name, c.count) for c in store.collections()] == [("hurt", 5), ("kept", 5)]
    finally:
        store.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imgembed.store.qdrant"):
        QdrantStore(path=folder).close()
    assert caplog.text == ""


def test_a_damaged_registry_is_a_503_that_clients_are_told_not_to_retry(tmp_path):
    """Retrying cannot mend a file: no Retry-After (OpenAI's SDKs and proxies would repeat the
    request), x-should-retry: false, the file named; the CLI's exit as for any store error."""
    from fastapi.testclient import TestClient

    from imgembed.api.app import create_app
    from imgembed.config import load_settings

    folder = tmp_path / "qdrant"
    _two_collections(folder)
    _first_row(folder / "collection" / "imgembed_collections" / "storage.sqlite", b"garbage")
    settings = load_settings(model="imgembed-tiny", pretrained="seed:0", store="qdrant",
                             data_dir=tmp_path)  # fmt: skip
    with TestClient(create_app(settings)) as client:
        answer = client.get("/api/v1/collections")
    assert answer.status_code == 503, answer.text
    assert answer.headers["x-should-retry"] == "false" and "retry-after" not in answer.headers
    assert answer.json()["error_type"] == "StoreDamagedError"
    assert "imgembed_collections is damaged" in answer.json()["error"]


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """`folder` and all in it read-only: chmod, or for root (whom chmod does not stop) a
    read-only bind mount; the test is skipped where neither stops a write."""
    mounted = os.geteuid() == 0
    if mounted:
        bind = [["mount", "--bind", folder, folder], ["mount", "-o", "remount,bind,ro", folder]]
        for step, command in enumerate(bind):
            if subprocess.run(command, capture_output=True).returncode != 0:
                if step:
                    subprocess.run(["umount", "--lazy", folder], check=True)
                pytest.skip("as root chmod does not stop writes, and mount is refused here")
    else:
        for inside in [folder, *folder.rglob("*")]:
            inside.chmod(inside.stat().st_mode & ~0o222)
    try:
        with contextlib.suppress(OSError), open(folder / "probe", "w"):
            pytest.skip(f"{folder} can still be written")
        yield
    finally:
        if mounted:  # lazy: files a failed open left to the garbage collector are let go
            subprocess.run(["umount", "--lazy", folder], check=True)
        else:
            for inside in [folder, *folder.rglob("*")]:
                inside.chmod(inside.stat().st_mode | 0o200)


def test_a_read_only_local_qdrant_folder_is_named_as_such(data_dir):
    """A Qdrant folder that cannot be written was a bare StoreError ("opening Qdrant failed:
    OSError: [Errno 30] Read-only file system: '.../.lock'"), read as a broken store. It is a
    DataDirError (the CLI's exit 3, HTTP 503) naming the folder, the cause and what to do;
    qdrant-client writes its lock file there on opening, so searches cannot open it either."""
    folder = data_dir / "qdrant"
    _two_collections(folder)
    with _read_only(folder):
        with pytest.raises(DataDirError) as caught:
            QdrantStore(path=folder)
        proc = run("collections", env={"IMGEMBED_STORE": "qdrant"})
    message = str(caught.value)
    assert message.startswith(f"Qdrant's local folder {folder} cannot be written (")
    assert f"at {folder / '.lock'}): opening Qdrant failed" in message
    assert message.endswith("make it writable for this user, or set IMGEMBED_DATA_DIR to a "
                            "folder you can write")  # fmt: skip
    assert proc.returncode == 3 and f"Qdrant's local folder {folder} cannot" in proc.stderr


def test_writes_refused_in_a_local_qdrant_folder_are_named_and_reads_go_on(tmp_path):
    """The folder opens (its lock file can be written) but its collections cannot: creating a
    collection or storing items was a bare StoreError (PermissionError, or SQLite's "attempt
    to write a readonly database", naming no file). Each is a DataDirError naming the
    folder; searches and counts work."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    rng = np.random.default_rng(3)
    with _read_only(folder / "collection"):
        store = QdrantStore(path=folder)
        try:
            assert store.count("kept") == 5 and len(store.search("kept", _unit(rng))) == 5
            with pytest.raises(DataDirError) as created:
                store.create_collection("new", PROV)
            with pytest.raises(DataDirError) as stored:
                store.upsert("kept", [Record("kept-9", _unit(rng), "h", "s")])
            assert store.count("kept") == 5 and [c.name for c in store.collections()] == [
                "hurt", "kept"]  # fmt: skip
        finally:
            store.close()
    for caught, action in [(created, "creating collection 'new'"),
                           (stored, "storing 1 items in 'kept'")]:  # fmt: skip
        message = str(caught.value)
        assert message.startswith(f"Qdrant's local folder {folder} cannot be written (")
        assert f"): {action} failed (searches and listings still work); make it " in message


def test_a_collection_file_this_user_may_not_read_is_not_set_aside_as_damaged(tmp_path):
    """A storage.sqlite this user may not read (chmod 000, another user's) was taken for a
    damaged file: moved to damaged/, the collection started empty. It is a DataDirError
    naming the file, and nothing is moved. Root reads any file, so the opening runs in a
    process without the capabilities that let it."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    storage = folder / "collection" / "hurt" / "storage.sqlite"
    storage.chmod(0)
    opening = (
        "from imgembed.errors import DataDirError\n"
        "from imgembed.store.qdrant import QdrantStore\n"
        f"try:\n    QdrantStore(path={str(folder)!r})\n"
        "except DataDirError as e:\n    print(e)\n    raise SystemExit(3)\n"
    )
    command = [sys.executable, "-c", opening]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        storage.chmod(0o644)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"permission denied at {storage}" in proc.stdout
    assert not (folder / "damaged").exists() and storage.exists()
    store = QdrantStore(path=folder)
    try:  # readable again: both there, whole
        assert store.count("hurt") == 5 and store.count("kept") == 5
    finally:
        store.close()


# what an open store of _two_collections holds: the lock file, one SQLite file a collection
OPEN_FILES = [".lock"] + [
    f"collection/{name}/storage.sqlite" for name in ("hurt", "imgembed_collections", "kept")
]


def _open_files(folder: Path) -> list[str]:
    """The files under `folder` this process holds open (its SQLite files, the lock file),
    each once per descriptor."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listing the folder itself
            if (target := os.readlink(f"/proc/self/fd/{fd}")).startswith(f"{folder}/"):
                held.append(target[len(str(folder)) + 1 :])
    return sorted(held)


@contextlib.contextmanager
def _no_garbage_collector() -> Iterator[None]:
    """What is closed, closed by us: the collector would close it some time later too.
    Earlier tests' garbage goes first (their unclosed connections are not this test's)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_local_qdrant_folder_busy_elsewhere_leaves_no_file_open(tmp_path):
    """qdrant-client loads every collection before it takes the folder's lock: an opening
    refused as another store holds the folder left this process holding each collection's
    SQLite file (3 more descriptors here) and the lock file, until the garbage collector ran
    ("ResourceWarning: unclosed file .lock"); the service opens the store again on each
    request, so each held 3 more. Nothing more is held than the other store's own."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    other = QdrantStore(path=folder)
    try:
        held = _open_files(folder)
        assert held == OPEN_FILES
        with _no_garbage_collector(), warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always", ResourceWarning)
            for _ in range(3):
                with pytest.raises(StoreBusyError):
                    QdrantStore(path=folder)
                assert _open_files(folder) == held
            gc.collect()
        ours = ("sqlite3", str(folder))  # not another test's connection the collector found
        unclosed = [str(w.message) for w in warned if w.category is ResourceWarning]
        assert [message for message in unclosed if any(o in message for o in ours)] == []
    finally:
        other.close()
    assert _open_files(folder) == []


def test_a_repaired_local_qdrant_opening_leaves_no_file_of_the_failed_one_open(tmp_path):
    """An opening that failed on a damaged point, then opened again once it was taken out,
    kept the failed client's SQLite files of the collections loaded before it (the
    registry's and 'kept': 2 more descriptors) while the store was open and after it was
    closed, until the garbage collector ran."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    _first_row(folder / "collection" / "hurt" / "storage.sqlite", b"garbage")
    with _no_garbage_collector():
        store = QdrantStore(path=folder)
        try:
            assert store.count("hurt") == 4 and store.count("kept") == 5
            assert _open_files(folder) == OPEN_FILES
        finally:
            store.close()
        assert _open_files(folder) == []


def test_misfits_in_a_read_only_local_qdrant_collection_are_named_and_the_rest_serves(
    tmp_path, caplog
):
    """Items to take out of a collection that cannot be written (a read-only mount, another
    user's files): the whole opening failed (DataDirError "opening Qdrant failed (qdrant-client
    writes there on opening, even to search)", though it had opened), a copy of the file left
    in damaged/. Nothing is changed: each collection serves as it is, the misfit named with
    what to do, and a search it fails is a StoreDamagedError saying why; once the folder can
    be written, the next opening takes the items out."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    storage = folder / "collection" / "hurt" / "storage.sqlite"
    _every_point(storage, lambda v: v[:3])
    rng = np.random.default_rng(1)
    with _read_only(folder / "collection"):
        with caplog.at_level(logging.WARNING):
            store = QdrantStore(path=folder)
        try:
            assert [(c.name, c.count) for c in store.collections()] == [("hurt", 5), ("kept", 5)]
            assert store.search("kept", _unit(rng))[0].id.startswith("kept-")
            with pytest.raises(StoreDamagedError) as caught:
                store.search("hurt", _unit(rng))
        finally:
            store.close()
    why = (
        "Qdrant's local collection 'hurt' holds vectors that do not fit it, which could not be "
        f"taken out, as {storage.parent} cannot be written ("
    )
    assert why in caplog.text
    assert (
        "): make it writable for this user and open Qdrant again, which mends it; till then it "
        "is served as it is"
    ) in caplog.text
    assert str(caught.value).startswith(f"searching 'hurt' failed: {why}")
    assert not (folder / "damaged").exists()
    store = QdrantStore(path=folder)  # writable again: taken out
    try:
        assert store.count("hurt") == 0 and store.count("kept") == 5
    finally:
        store.close()


def test_an_empty_local_qdrant_collection_with_wrong_settings_needs_only_meta_json(
    tmp_path, caplog
):
    """An empty collection whose meta.json names another length than the registry: its
    loaded array (no rows, the settings' width) was read as points that misfit, so with its
    folder read-only it was said to hold vectors that could not be taken out and was served
    unmended (every call a StoreDamagedError), though only meta.json, writable, needed
    setting right."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    store = QdrantStore(path=folder)
    store.create_collection("empty", PROV)
    store.close()
    meta = folder / "meta.json"
    listed = json.loads(meta.read_text())
    listed["collections"]["empty"]["vectors"]["size"] = 3
    meta.write_text(json.dumps(listed))
    rng = np.random.default_rng(1)
    with _read_only(folder / "collection" / "empty"):
        with caplog.at_level(logging.WARNING):
            store = QdrantStore(path=folder)
        try:
            assert store.search("empty", _unit(rng)) == []
        finally:
            store.close()
    assert json.loads(meta.read_text())["collections"]["empty"]["vectors"]["size"] == 8
    assert "its settings in" in caplog.text and "holds vectors" not in caplog.text
