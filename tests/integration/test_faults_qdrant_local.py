"""Damaged files in Qdrant's local mode (qdrant-client's own files under the data directory,
no server): its list of collections (meta.json) and a collection's points (storage.sqlite,
one pickled point per row). Real files, the real client."""

from pathlib import Path

import numpy as np
import pytest

from imgembed.errors import StoreUnavailableError
from imgembed.store import Provenance, Record
from imgembed.store.qdrant import QdrantStore

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
def test_a_damaged_local_qdrant_meta_json_is_named_with_what_to_do(tmp_path, damage):
    """qdrant-client's list of its collections cut short, emptied or not JSON was a bare
    StoreError quoting the JSON parser, naming the folder but not the file to restore."""
    folder = tmp_path / "qdrant"
    _two_collections(folder)
    spoil, why = damage
    spoil(folder / "meta.json")
    with pytest.raises(StoreUnavailableError) as caught:
        QdrantStore(path=folder)
    message = str(caught.value)
    assert message.startswith(f"Qdrant's local list of collections {folder / 'meta.json'} ")
    assert why in message
    assert message.endswith(f"restore it from a backup, or move {folder} away and index again")
