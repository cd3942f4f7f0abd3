"""Policy shared by the CLI and the HTTP service, in the library: a collection is searched
with its own model, duplicate thresholds come from the model's facts, and a search reads
the collection's provenance without counting its rows."""

from pathlib import Path

import pytest

from imgembed import (
    CollectionNotFoundError,
    ImageEmbeddingService,
    ProvenanceMismatchError,
    SourceNotAllowedError,
)
from imgembed.indexing import IndexItem
from imgembed.models.registry import CLIP_DUPLICATE_THRESHOLD
from imgembed.store import Provenance
from imgembed.store.qdrant import QdrantStore
from tests.conftest import TINY


def _index(service, photos, name="shop"):
    return service.index([IndexItem(str(p), str(p)) for p in photos], name)


def test_search_reads_provenance_without_counting(data_dir, photos, monkeypatch):
    with ImageEmbeddingService(**TINY) as service:
        _index(service, photos)
        store = service.store
        assert store.provenance("shop") == service.provenance

        def counting(*args, **kwargs):
            raise AssertionError("a search must not count the collection's rows")

        monkeypatch.setattr(store, "get_collection", counting)
        monkeypatch.setattr(store, "count", counting)
        hits = service.search_image(photos[1], "shop", top_k=3)
        assert hits[0].image_path == str(photos[1]) and len(hits) == 3
        with pytest.raises(CollectionNotFoundError):
            store.provenance("nothing")


def test_qdrant_provenance_without_counting(tmp_path):
    store = QdrantStore(path=tmp_path / "qdrant")
    provenance = Provenance("imgembed-tiny", "seed:0", 8, "abc123")
    store.create_collection("c", provenance)
    assert store.provenance("c") == provenance
    with pytest.raises(CollectionNotFoundError):
        store.provenance("other")
    store.close()


def test_for_collection_embeds_with_the_collections_model(data_dir, photos):
    with ImageEmbeddingService(**TINY) as indexer:
        _index(indexer, photos)
    with ImageEmbeddingService(model="imgembed-tiny", pretrained="seed:1") as service:
        searcher = service.for_collection("shop")
        assert searcher is not service and searcher is service.for_collection("shop")
        assert (searcher.model_ref.name, searcher.model_ref.pretrained) == (
            "imgembed-tiny",
            "seed:0",
        )
        assert searcher.store is service.store  # one connection for both
        hits = searcher.search_image(photos[0], "shop", top_k=1)
        assert hits[0].image_path == str(photos[0])
        assert hits[0].similarity_score == pytest.approx(1, abs=1e-5)
        assert searcher.for_collection("shop") is searcher
        with pytest.raises(CollectionNotFoundError):
            service.for_collection("nothing")


def test_duplicates_use_the_models_threshold(data_dir, photos, tmp_path):
    copies = []
    for n, photo in enumerate(photos[:2]):
        copy = tmp_path / f"copy{n}{photo.suffix}"
        copy.write_bytes(photo.read_bytes())
        copies.append(copy)
    with ImageEmbeddingService(**TINY) as service:
        _index(service, [*photos, *copies])
        found = service.duplicates("shop")
        assert found.threshold == CLIP_DUPLICATE_THRESHOLD
        groups = [{Path(source).name for _, source in group} for group in found.groups]
        for photo, copy in zip(photos, copies, strict=False):  # an exact copy: cosine 1
            assert any({photo.name, copy.name} <= group for group in groups)
        assert service.duplicates("shop", threshold=1.01).groups == []


def test_create_collection_is_create_or_get_and_loads_no_model_for_an_existing_one(
    data_dir, monkeypatch
):
    with ImageEmbeddingService(**TINY) as service:
        info, created = service.create_collection("shop")
        assert created and info.provenance == service.provenance and info.count == 0
        again, created = service.create_collection("shop", "imgembed-tiny", "seed:0")
        assert not created and again.provenance == info.provenance

        def loading(*args, **kwargs):
            raise AssertionError("an existing collection named with its own model loads none")

        monkeypatch.setattr(service, "with_model", loading)
        assert service.create_collection("shop", "imgembed-tiny", "seed:0")[1] is False
        monkeypatch.undo()
        with pytest.raises(ProvenanceMismatchError):  # built with seed:0, not seed:1
            service.create_collection("shop", "imgembed-tiny", "seed:1")
        with pytest.raises(SourceNotAllowedError):  # the server offers only its own model
            service.create_collection("new", "efficientnet-lite0", models=[])
        assert [c.name for c in service.store.collections()] == ["shop"]
        other, created = service.create_collection("other", "imgembed-tiny", "seed:1")
        assert created and other.provenance.pretrained == "seed:1"
