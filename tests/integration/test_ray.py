"""Indexing and the catalogue's bulk job on a local Ray (2 CPUs, started once for the module):
Ray's vectors equal the local run's, failures are typed, reruns skip, a killed encoder actor
is retried and a killed driver resumes, each image stored exactly once."""

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
import ray
from PIL import Image

from imgembed import ImageEmbeddingService
from imgembed.catalog import Catalog
from imgembed.config import Settings
from imgembed.distributed import cluster, embed_dataset, embed_store, index
from imgembed.distributed.stages import KILL_SWITCH, outcomes
from imgembed.errors import ConfigurationError, StoreUnavailableError
from imgembed.indexing import read_index_sources
from imgembed.store import embedded
from imgembed.store.postgres import PostgresStore
from tests.cli import IMGEMBED, run_process
from tests.conftest import TINY
from tests.integration.test_catalog import _products, _vectors

TINY_ARGS = ["--model", "imgembed-tiny", "--pretrained", "seed:0"]


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A local Ray for the module; its workers inherit the kill switch's path."""
    os.environ[KILL_SWITCH] = str(tmp_path_factory.mktemp("ray") / "kill-an-encoder-actor")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    del os.environ[KILL_SWITCH]


def _folder(photos, root: Path) -> Path:
    """The real photos, a text file named like a JPEG and a truncated PNG."""
    root.mkdir()
    for photo in photos:
        (root / photo.name).write_bytes(photo.read_bytes())
    (root / "notes.jpg").write_text("not an image")
    png = next(p for p in photos if p.suffix == ".png")
    (root / "truncated.png").write_bytes(png.read_bytes()[:400])
    return root


def _cosines(store, a: str, b: str) -> dict[str, float]:
    hashes = store.hashes(a)
    left = {r.id: r.vector for r in store.get(a, sorted(hashes))}
    right = {r.id: r.vector for r in store.get(b, sorted(hashes))}
    return {i: float(left[i] @ right[i]) / float(np.linalg.norm(left[i]) * np.linalg.norm(right[i]))
            for i in left}  # fmt: skip


def test_index_on_ray_equals_local_with_a_killed_actor_and_reruns_skip(
    ray_address, data_dir, photos, tmp_path
):
    folder = _folder(photos, tmp_path / "shop")
    with ImageEmbeddingService(**TINY) as service:
        items = read_index_sources([str(folder)], service.settings.supported_formats)
        local = service.index(items, "local")
        assert (local.successful, local.failed) == (len(photos), 2)

        switch = Path(os.environ[KILL_SWITCH])
        switch.touch()  # the first encoder actor to see it has itself killed (ray.kill)
        seen = []
        first = index(service, items, "ray", progress=seen.append)
        assert not switch.exists(), "no encoder actor was killed"
        assert (first.total, first.processed, first.successful) == (len(items), len(items), 6)
        assert (first.failed, first.skipped) == (2, 0)
        failed = {f["id"]: f["error_type"] for f in first.failures}
        assert failed == {
            str(folder / "notes.jpg"): "InvalidImageError",
            str(folder / "truncated.png"): "InvalidImageError",
        }
        assert failed == {f["id"]: f["error_type"] for f in local.failures}
        assert seen[-1].done == len(items) and seen[-1].failed == 2

        store = service.store
        assert store.hashes("ray") == store.hashes("local")  # same ids, same contents
        assert store.count("ray") == len(photos)  # nothing lost, nothing twice
        cosines = _cosines(store, "ray", "local")
        assert min(cosines.values()) >= 0.99999, cosines
        assert store.provenance("ray") == store.provenance("local") == service.provenance

        again = index(service, items, "ray")
        assert (again.successful, again.skipped, again.failed) == (0, len(photos), 2)
        assert store.count("ray") == len(photos)


def test_embed_dataset_over_a_users_binary_files(ray_address, photos, tmp_path):
    folder = _folder(photos, tmp_path / "files")
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    known = photos[0].name  # as if already stored: skipped, never encoded

    def mark(row):
        name = Path(row["path"]).name
        return {**row, "stored_hash": digests[name] if name == known else None}

    ds = ray.data.read_binary_files(str(folder), include_paths=True).map(mark)
    out = embed_dataset(ds, TINY, column="bytes").take_all()
    rows = {Path(row["path"]).name: row for row in out}
    assert set(rows) == set(digests)
    with ImageEmbeddingService(**TINY) as service:
        for name, row in rows.items():
            assert row["content_hash"] == digests[name]
            if name == known:
                assert (row["status"], row["embedding"]) == ("skipped", None)
            elif name in ("notes.jpg", "truncated.png"):
                assert (row["status"], row["error_type"]) == ("failed", "InvalidImageError")
            else:
                assert row["status"] == "embedded" and row["error"] is None
                local = service.embed_image(folder / name)
                assert float(np.asarray(row["embedding"]) @ local) >= 0.99999
                assert json.loads(row["image_metadata"])["width"] > 0


def _tiles(large_jpegs, folder: Path, count: int, size: int = 512) -> list[Path]:
    """Distinct real images: PNG tiles cut from the large photos (slow enough to decode that
    a run can be killed in the middle)."""
    folder.mkdir()
    photos = [Image.open(path).convert("RGB") for path in large_jpegs]
    paths = []
    for n in range(count):
        photo = photos[n % len(photos)]
        k = n // len(photos)
        columns = photo.width // size
        box = ((k % columns) * size, (k // columns) * size)
        path = folder / f"tile-{n:03d}.png"
        photo.crop((*box, box[0] + size, box[1] + size)).save(path, compress_level=1)
        paths.append(path)
    return paths


def _once_stored(run: subprocess.Popen, data_dir: Path, count: int) -> PostgresStore:
    """The store, once the running `index` into "tiles" has stored `count` items."""
    store = None
    deadline = time.time() + 180
    while time.time() < deadline and run.poll() is None:
        time.sleep(0.1)
        try:
            store = store or PostgresStore(embedded.start(data_dir))
            if store.count("tiles") >= count:
                break
        except Exception:  # the collection or the server is not there yet
            continue
    assert run.poll() is None and store is not None, "the run ended before it could be stopped"
    return store


def test_a_driver_killed_mid_run_resumes_storing_each_image_once(
    ray_address, data_dir, large_jpegs, tmp_path
):
    tiles = _tiles(large_jpegs, tmp_path / "tiles", 30)
    (tmp_path / "tiles" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    command = [IMGEMBED, "index", str(tmp_path / "tiles"), "-c", "tiles", *TINY_ARGS]
    # The first driver joins the module's cluster (killing it leaves no Ray of its own
    # behind), and writes small batches, so that it can be killed between two of them.
    first = subprocess.Popen(
        [*command, "--batch-size", "2", "--ray", ray_address], stderr=subprocess.DEVNULL
    )
    store = _once_stored(first, data_dir, 2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(1)  # writes already sent commit or roll back
    stored_before = store.count("tiles")
    assert 2 <= stored_before < len(tiles)

    # The rerun starts a Ray of its own (--ray without an address) and writes the failures.
    failures = tmp_path / "failures.jsonl"
    second = run_process(*command[1:], "--failures", str(failures), "--ray")
    assert second.returncode == 1, second.stderr  # the broken file
    assert "on Ray (local)" in second.stderr
    assert f"Skipped: {stored_before} (unchanged)" in second.stderr
    assert f"Successful: {len(tiles) - stored_before}" in second.stderr
    assert "Failed: 1" in second.stderr
    (failure,) = [json.loads(line) for line in failures.read_text().splitlines()]
    assert failure["id"].endswith("broken.png") and failure["error_type"] == "InvalidImageError"
    hashes = store.hashes("tiles")
    assert hashes == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in tiles}
    assert store.count("tiles") == len(tiles)
    store.close()


def test_sigterm_stops_a_ray_run_as_ctrl_c_does(ray_address, data_dir, large_jpegs, tmp_path):
    """Ray's core worker puts a crash handler on SIGTERM (it aborted the driver: exit 134,
    no word of how far it got); the CLI's own handler is put back."""
    tiles = _tiles(large_jpegs, tmp_path / "tiles", 30)
    command = [IMGEMBED, "index", str(tmp_path / "tiles"), "-c", "tiles", *TINY_ARGS]
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        run = subprocess.Popen([*command, "--batch-size", "2", "--ray", ray_address], stderr=stderr)
        store = _once_stored(run, data_dir, 2)
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=120)
    out = log.read_text()
    assert run.returncode == 130, out
    told = re.search(
        rf"Interrupted after (\d+) of {len(tiles)} images \('tiles' now holds (\d+)", out
    )
    assert told, out
    # the driver hears of a batch after its writer stored it: the store's count is the truth
    assert int(told[2]) >= max(2, int(told[1]))
    assert "SIGTERM received" not in out and "Traceback" not in out
    assert "core_worker.cc" not in out  # Ray's own log lines stay in its files
    store.close()


def test_catalog_embed_on_ray_equals_local_fused_vectors(ray_address, data_dir, photos, tmp_path):
    products = [*_products(photos), {"id": "broken", "title": "Broken", "image_url": "/nope.jpg"}]
    with Catalog(**TINY) as catalog:
        for store_id in ("here", "ray"):
            catalog.upsert_products(store_id, products)
        local = catalog.embed("here", batch_size=3)
        assert (local.successful, local.failed) == (len(products) - 1, 1)

        batches = []
        events = _Events(batches)
        stats = embed_store(catalog, "ray", batch_size=3, events=events)
        assert (stats.total, stats.successful, stats.failed) == (
            len(products),
            len(products) - 1,
            1,
        )
        assert (stats.skipped, stats.text_only) == (0, 2)
        assert stats.failures[0]["error_type"] == "ImageNotFoundError"
        assert sum(batches) == stats.to_process == len(products)
        assert events.outcomes["broken"].endswith("(ImageNotFoundError)")
        assert {k for k, v in events.outcomes.items() if v is None} == {
            p["id"] for p in products
        } - {"broken"}

        here, there = _vectors(catalog, "here"), _vectors(catalog, "ray")
        assert set(here) == set(there) == {p["id"] for p in products}
        assert here.pop("broken")[0] is None and there["broken"][0] is None
        for product_id, (text, image, combined, w_image, w_text) in here.items():
            other = there[product_id]
            assert (other[3], other[4]) == (w_image, w_text)
            assert np.allclose(other[0], text, atol=1e-6)
            assert (image is None) == (other[1] is None)
            if image is not None:
                assert float(image @ other[1]) / float(image @ image) >= 0.99999
            assert np.allclose(other[2], combined, atol=1e-5)
        with psycopg.connect(catalog.repository.url) as connection:
            status = connection.execute(
                "SELECT status, error_type FROM imgembed_products"
                " WHERE store_id = 'ray' AND product_id = 'broken'"
            ).fetchone()
        assert status == ("failed", "ImageNotFoundError")


class _Events:
    def __init__(self, batches: list[int]):
        self.batches = batches
        self.outcomes: dict[str, str | None] = {}

    def started(self, stats):
        pass

    def batch(self, number, stats, size):
        self.batches.append(size)

    def product(self, product_id, error, text_only=False):
        self.outcomes[product_id] = error

    def batch_done(self, stats):
        pass


def test_stores_the_workers_cannot_reach_are_refused(ray_address, data_dir, monkeypatch):
    settings = Settings(**TINY)
    assert cluster.all_nodes_here()  # this Ray runs here: the embedded server is passed on
    url = embedded.start(data_dir)
    assert cluster.worker_settings(settings).database_url == url
    qdrant = settings.model_copy(update={"store": "qdrant"})
    assert cluster.postgres_settings(qdrant).database_url == url  # the catalogue's database
    external = settings.model_copy(update={"database_url": "postgresql://db.internal/shop"})
    monkeypatch.setattr(cluster, "all_nodes_here", lambda: False)
    with pytest.raises(ConfigurationError, match="IMGEMBED_DATABASE_URL"):
        cluster.worker_settings(settings)
    assert cluster.worker_settings(external) is external
    with pytest.raises(ConfigurationError, match="IMGEMBED_QDRANT_URL"):
        cluster.worker_settings(qdrant)


def _store_down(batch):
    raise StoreUnavailableError("cannot connect to PostgreSQL at db:5432/shop: refused")


def test_a_workers_typed_error_reaches_the_driver_as_itself(ray_address):
    cluster.configure_data()
    ds = ray.data.from_items([{"id": "a"}]).map_batches(_store_down, batch_format="pyarrow")
    with pytest.raises(StoreUnavailableError) as caught:
        list(outcomes(ds))
    assert str(caught.value) == "cannot connect to PostgreSQL at db:5432/shop: refused"
