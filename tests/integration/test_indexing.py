"""Indexing into the embedded Postgres: incremental, idempotent, prunable, resumable after
kill -9; catalogues with metadata; search by text and image; provenance."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgembed import ImageEmbeddingService
from imgembed.errors import (
    CollectionNotFoundError,
    ConfigurationError,
    ProvenanceMismatchError,
    StoreBusyError,
    StoreError,
)
from imgembed.indexing import IndexItem, read_index_sources
from imgembed.store import embedded
from imgembed.store.postgres import PostgresStore
from tests.conftest import TINY

IMGEMBED = str(Path(sys.executable).with_name("imgembed"))


@pytest.fixture
def data_dir(tmp_path):
    folder = Path(os.environ["IMGEMBED_DATA_DIR"])
    yield folder
    embedded.stop(folder)


def _crops(large_jpegs, folder: Path, count: int, size: int = 320) -> list[Path]:
    """Distinct real images: tiles cut from the large photos."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        photo = Image.open(large_jpegs[n % len(large_jpegs)])
        k = n // len(large_jpegs)  # the k-th cell of a grid over the photo
        columns = photo.width // size
        x, y = (k % columns) * size, (k // columns) * size
        path = folder / f"tile-{n:03d}.png"
        photo.crop((x, y, x + size, y + size)).save(path)
        paths.append(path)
    return paths


def _items(paths) -> list[IndexItem]:
    return [IndexItem(str(p), str(p)) for p in paths]


def test_incremental_index_skip_change_and_prune(data_dir, photos, tmp_path, monkeypatch):
    folder = tmp_path / "shop"
    folder.mkdir()
    for photo in photos:
        (folder / photo.name).write_bytes(photo.read_bytes())
    with ImageEmbeddingService(**TINY, cache_embeddings=False) as service:
        items = read_index_sources([str(folder)], service.settings.supported_formats)
        first = service.index(items, "shop")
        assert (first.total, first.successful, first.skipped, first.failed) == (6, 6, 0, 0)
        # unchanged items are neither decoded nor encoded again (no cache needed for that),
        # and progress calls them skipped, as the stats do
        encoded = []
        encode = service.encoder.encode_images
        monkeypatch.setattr(
            service.encoder, "encode_images", lambda x: encoded.append(x) or encode(x)
        )
        seen = []
        again = service.index(items, "shop", progress=seen.append)
        assert (again.successful, again.skipped) == (0, 6)
        assert encoded == []
        assert (seen[-1].done, seen[-1].skipped, seen[-1].embedded, seen[-1].cached) == (6, 6, 0, 0)

        changed = folder / photos[0].name
        Image.open(photos[1]).save(changed, format=Image.open(photos[0]).format)
        (folder / photos[2].name).unlink()
        items = read_index_sources([str(folder)], service.settings.supported_formats)
        third = service.index(items, "shop", prune=True)
        assert (third.successful, third.skipped, third.pruned) == (1, 4, 1)
        stored = service.store.hashes("shop")
        assert len(stored) == 5
        assert stored[str(changed)] == hashlib.sha256(changed.read_bytes()).hexdigest()

        for typo in (tmp_path / "shpo", tmp_path / "shop.csv"):  # a missing folder or list
            missed = read_index_sources([str(typo)], service.settings.supported_formats)
            stats = service.index(missed, "shop", prune=True)
            assert (stats.failed, stats.pruned, stats.prune_skipped) == (1, 0, True)
            assert stats.failures[0]["error_type"] == "ImageNotFoundError"
        assert len(service.store.hashes("shop")) == 5

        # a catalogue row that names its id but no image keeps that item and blocks no
        # pruning of the others (it read as "some sources could not be read")
        listed = tmp_path / "k.csv"
        kept = sorted(service.store.hashes("shop"))
        listed.write_text(f"id,image\n{kept[0]},{kept[0]}\n{kept[1]},\n")
        items = read_index_sources([str(listed)], service.settings.supported_formats)
        stats = service.index(items, "shop", prune=True)
        assert (stats.failed, stats.pruned, stats.prune_skipped) == (1, 3, False)
        assert sorted(service.store.hashes("shop")) == kept[:2]


def test_ids_do_not_depend_on_the_working_directory(tmp_path, photos, monkeypatch):
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "a.png").write_bytes(photos[0].read_bytes())
    monkeypatch.chdir(tmp_path)
    relative = read_index_sources(["pics"], [".png"])
    monkeypatch.chdir(folder)
    here = read_index_sources(["."], [".png"])
    assert relative[0].id == here[0].id == str(folder / "a.png")


def test_catalogue_files_with_metadata_and_filters(data_dir, photos, tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for n, photo in enumerate(photos):
        (tmp_path / "img" / photo.name).write_bytes(photo.read_bytes())
        category = "fashion" if n % 2 else "interior"
        rows.append({"id": f"sku-{n}", "image": f"img/{photo.name}", "category": category,
                     "price": f"{10 + n}"})  # fmt: skip
    csv_file = tmp_path / "products.csv"
    csv_file.write_text(
        "id,image,category,price\n"
        + "".join(f"{r['id']},{r['image']},{r['category']},{r['price']}\n" for r in rows)
    )
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"image_url": str(photos[0]), "id": "extra", "shop": "x"}) + "\n")
    listing = tmp_path / "list.txt"
    listing.write_text(f"img/{photos[1].name}\n\n")
    with ImageEmbeddingService(**TINY) as service:
        items = read_index_sources([str(csv_file), str(jsonl), str(listing)], [".png"])
        assert [i.id for i in items][:2] == ["sku-0", "sku-1"] and len(items) == 8
        assert items[0].metadata == {"category": "interior", "price": "10"}
        stats = service.index(items, "catalogue")
        assert stats.successful == 8
        query = service.embed_image(photos[3])
        hits = service.search_vector(query, "catalogue", top_k=3, filters={"category": "fashion"})
        assert hits[0].metadata["id"] == "sku-3" and hits[0].similarity_score > 0.999
        assert all(h.metadata["category"] == "fashion" for h in hits)
        assert hits[0].metadata["width"] > 0 and "confidence" in hits[0].metadata


async def test_search_by_text_image_and_collection_name(data_dir, photos):
    with ImageEmbeddingService(**TINY) as service:
        service.index(_items(photos), "photos")
        by_image = service.search_image(photos[4], "photos", top_k=2)
        assert by_image[0].image_path == str(photos[4]) and by_image[0].rank == 1
        by_text = service.search_text("a rocket", "photos", top_k=3)
        assert len(by_text) == 3 and by_text[0].similarity_score >= by_text[1].similarity_score
        pairs = await service.find_similar_images(service.embed_image(photos[2]), "photos", top_k=1)
        assert pairs[0][0] == str(photos[2]) and pairs[0][1] == pytest.approx(1, abs=1e-5)
    other = ImageEmbeddingService(model="imgembed-tiny", pretrained="seed:1")
    with pytest.raises(ProvenanceMismatchError, match="--model imgembed-tiny --pretrained seed:0"):
        other.search_text("a rocket", "photos")
    other.close()


def test_items_given_twice_under_one_id_keep_the_first_and_fail_the_second(data_dir, photos):
    """Items of the library or of an HTTP request's "items" with an id given twice, as a
    list file's rows: the first is stored, the second fails naming it, an exact repeat is
    one item; a re-run skips them (it did store both, the last over the first, counted 2,
    and each re-run swapped the stored image back and forth)."""
    items = [
        IndexItem("sku", str(photos[0])),
        IndexItem("sku", str(photos[1])),
        IndexItem("same", str(photos[2])),
        IndexItem("same", str(photos[2])),
    ]
    with ImageEmbeddingService(**TINY) as service:
        first = service.index(items, "dups")
        assert (first.total, first.successful, first.failed) == (3, 2, 1), first
        (failure,) = first.failures
        assert failure["source"] == str(photos[1])
        assert f"the same id ('sku') as {str(photos[0])!r}, which is kept" in failure["error"]
        assert service.store.stored_items("dups")["sku"].source == str(photos[0])
        again = service.index(items, "dups")
        assert (again.successful, again.skipped, again.failed) == (0, 2, 1), again
        assert service.store.stored_items("dups")["sku"].source == str(photos[0])


@pytest.mark.slow
def test_a_changed_price_or_category_in_a_list_is_stored_again(data_dir, photos, tmp_path):
    """Same images, other metadata: the changed rows are stored again (their vectors from
    the embedding cache), the rest skipped; a row as it was stays skipped."""
    listing = tmp_path / "catalog.csv"
    rows = [f"sku-{i},{photo},space,{10 + i}" for i, photo in enumerate(photos[:3])]
    listing.write_text("id,image,category,price\n" + "\n".join(rows) + "\n")
    with ImageEmbeddingService(**TINY) as service:
        formats = service.settings.supported_formats
        first = service.index(read_index_sources([str(listing)], formats), "shop")
        assert (first.successful, first.skipped) == (3, 0)
        same = service.index(read_index_sources([str(listing)], formats), "shop")
        assert (same.successful, same.skipped) == (0, 3)
        rows[1] = f"sku-1,{photos[1]},rockets,12"
        listing.write_text("id,image,category,price\n" + "\n".join(rows) + "\n")
        changed = service.index(read_index_sources([str(listing)], formats), "shop")
        assert (changed.successful, changed.skipped) == (1, 2)
        stored = service.store.stored_items("shop")
        assert (stored["sku-1"].metadata["category"], stored["sku-1"].metadata["price"]) == (
            "rockets",
            "12",
        )
        assert stored["sku-1"].metadata["width"] > 0  # what the image gives is kept
        hits = service.search_text("x", collection="shop", top_k=3, filters={"category": "rockets"})
        assert [(hit.image_path, hit.metadata["price"]) for hit in hits] == [(str(photos[1]), "12")]


def test_index_resumes_after_kill_9(data_dir, large_jpegs, tmp_path, vitb32_checkpoint):
    """Killed mid-run, the next run stores every image exactly once and embeds none twice."""
    images = _crops(large_jpegs, tmp_path / "tiles", 80)
    command = [IMGEMBED, "index", str(tmp_path / "tiles"), "-c", "tiles", "--batch-size", "8",
               "--model", "ViT-B-32", "--pretrained", str(vitb32_checkpoint)]  # fmt: skip
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = None
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
        if store is None and (data_dir / "postgres" / "postmaster.pid").exists():
            try:
                store = PostgresStore(embedded.start(data_dir))
            except Exception:
                continue
        if store is not None:
            try:
                if store.count("tiles") >= 16:
                    break
            except Exception:
                continue
    assert first.poll() is None, "the first run ended before it could be killed"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    stored_before = store.count("tiles")
    assert 16 <= stored_before < 80

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"Skipped: {stored_before} (unchanged)" in second.stderr
    assert f"Successful: {80 - stored_before}" in second.stderr
    hashes = store.hashes("tiles")
    assert len(hashes) == 80 == store.count("tiles")
    assert hashes == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in images}
    vectors = np.stack([r.vector for r in store.get("tiles", sorted(hashes))])
    # Flat regions of a wallpaper give identical tiles: one vector per distinct content.
    assert np.isfinite(vectors).all()
    assert len({v.tobytes() for v in vectors}) == len(set(hashes.values()))
    store.close()


def _has_index(service, collection: str) -> bool:
    import psycopg

    from imgembed.store.postgres import items_table

    with psycopg.connect(service.store.url) as connection:
        row = connection.execute("SELECT to_regclass(%s)", (f"{items_table(collection)}_hnsw",))
        return row.fetchone()[0] is not None


def test_a_bulk_run_builds_the_index_at_its_end_and_a_stopped_one_at_the_next(
    data_dir, large_jpegs, tmp_path
):
    paths = _crops(large_jpegs, tmp_path / "tiles", 12)
    with ImageEmbeddingService(**TINY, defer_index_min=4, batch_size=4) as service:
        # a run that dies after its first batch: the index stays set aside
        store = service.store
        upsert = store.upsert

        def die_after_one(name, records):
            upsert(name, records)
            raise KeyboardInterrupt

        store.upsert = die_after_one
        with pytest.raises(KeyboardInterrupt):
            service.index(_items(paths[:8]), "bulk")
        store.upsert = upsert
        assert store.count("bulk") == 4 and not _has_index(service, "bulk")
        # the next run stores the rest and builds it; searches find each image first
        stats = service.index(_items(paths[:8]), "bulk")
        assert (stats.successful, stats.skipped) == (4, 4) and _has_index(service, "bulk")
        # 4 new into 8: below half again, the index is maintained (never set aside)
        dropped = []
        store.bulk_load = lambda name, incoming: dropped.append(incoming) or False
        assert service.index(_items(paths), "bulk").successful == 4
        assert dropped == [4] and _has_index(service, "bulk")
        for record in store.get("bulk", [str(p) for p in paths[::3]]):  # as exact search
            found = [hit.score for hit in store.search("bulk", record.vector, top_k=3)]
            exact = [hit.score for hit in store.search("bulk", record.vector, 3, exact=True)]
            assert found == pytest.approx(exact, abs=1e-6) and found[0] > 0.9999


class _Stopped(Exception):
    pass


def test_a_run_stopped_during_its_index_build_stops_the_build(data_dir, large_jpegs, tmp_path):
    """A job stopped (its progress callback raises) while its collection's index is built,
    minutes for a large one, stops within a second instead of at the build's end; the next
    run builds the index."""
    from imgembed.store.postgres import items_table
    from tests.integration.test_stores import answered_within, index_builds_held, raised

    paths = _crops(large_jpegs, tmp_path / "tiles", 8)
    with ImageEmbeddingService(**TINY, defer_index_min=4, batch_size=4) as service:
        store = service.store
        refresh, stopped = store.refresh, threading.Event()

        def held(name, changed=True, waiting=None):  # the build waits for another session
            with index_builds_held(store.url, items_table(name)):
                stopped.set()
                refresh(name, changed, waiting)

        def progress(state):
            if stopped.is_set():
                said.append(state.waiting)  # the job's status tells what it waits for
                raise _Stopped

        said: list[str] = []
        store.refresh = held
        outcome = answered_within(
            lambda: raised(service.index, _items(paths), "bulk", progress=progress)
        )
        assert outcome and isinstance(outcome[0], _Stopped), "the run waited for its build"
        assert said == ["building the search index of 'bulk'"]
        store.refresh = refresh
        assert store.count("bulk") == 8 and not _has_index(service, "bulk")
        assert service.index(_items(paths), "bulk").skipped == 8 and _has_index(service, "bulk")


def test_a_collection_dropped_during_a_run_stops_it_saying_so(data_dir, large_jpegs, tmp_path):
    """Another process drops the collection while a run stores into it: the run stops with
    CollectionNotFoundError and does not claim that what it stored is kept."""
    paths = _crops(large_jpegs, tmp_path / "tiles", 12)
    with ImageEmbeddingService(**TINY, batch_size=4) as service:
        store = service.store
        other = PostgresStore(store.url)
        upsert = store.upsert

        def dropped_after_one(name, records):
            upsert(name, records)
            store.upsert = upsert
            other.drop_collection(name)

        store.upsert = dropped_after_one
        with pytest.raises(CollectionNotFoundError) as caught:
            service.index(_items(paths), "gone")
        message = str(caught.value)
        assert "it was dropped" in message and "Indexing stopped after" in message
        assert "are kept" not in message and "UndefinedTable" not in message
        # the same command makes it again
        assert service.index(_items(paths), "gone").successful == 12
        other.close()


def test_one_indexing_run_per_collection_at_a_time(data_dir, large_jpegs, tmp_path):
    """A run another process holds the collection for (a CLI `index` beside a server's job)
    is refused at once instead of both embedding everything; the lock goes when a run ends,
    also when it fails."""
    paths = _crops(large_jpegs, tmp_path / "tiles", 4)
    with ImageEmbeddingService(**TINY, batch_size=2) as service:
        store, other = service.store, PostgresStore(service.store.url)
        with other.writing("shop"):
            with pytest.raises(StoreBusyError, match="another indexing run") as caught:
                service.index(_items(paths), "shop")
            assert "are kept" not in str(caught.value)  # nothing ran: no resume advice
            with pytest.raises(StoreBusyError):
                store.check_not_busy("shop")
            other.check_not_busy("shop")  # its own lock does not stop its holder
            store.check_not_busy("other")  # nor anyone on another collection
        upsert = store.upsert

        def broken(name, records):
            raise StoreError("the disk broke")

        store.upsert = broken
        with pytest.raises(StoreError, match="the disk broke"):
            service.index(_items(paths), "shop")
        store.upsert = upsert
        other.check_not_busy("shop")  # the failed run let go
        assert service.index(_items(paths), "shop").successful == 4
        other.check_not_busy("shop")
        other.close()


def test_index_takes_sources_as_the_cli_does(data_dir, photos):
    # before: AttributeError: 'str' object has no attribute 'error', from inside the run
    folder, missing = photos[0].parent, photos[0].parent / "nope.jpg"
    with ImageEmbeddingService(**TINY) as service:
        stats = service.index([str(folder), missing], "plain")
        assert (stats.total, stats.successful, stats.failed) == (len(photos) + 1, len(photos), 1)
        assert service.index(photos[0], "plain").skipped == 1  # one source alone
        items = read_index_sources([str(photos[0])], service.settings.supported_formats)
        with pytest.raises(ConfigurationError, match="not int 7"):
            service.index([*items, 7], "plain")
        # items and sources together, as a request's: an item twice is one (was counted twice)
        mixed = service.index([*items, str(photos[0]), str(photos[1])], "mixed")
        assert (mixed.total, mixed.successful, mixed.failed) == (2, 2, 0)
