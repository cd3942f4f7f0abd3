"""Both vector stores against real backends: the embedded PostgreSQL (pgvector) and Qdrant's
local mode. Same contract: collections and provenance, upsert, search order, filters."""

import multiprocessing
import uuid

import numpy as np
import pytest

from imgembed.errors import CollectionNotFoundError, ProvenanceMismatchError, StoreError
from imgembed.store import Provenance, Record
from imgembed.store.postgres import PostgresStore, revisions
from imgembed.store.qdrant import QdrantStore

PROV = Provenance("imgembed-tiny", "seed:0", 8, "abc123")


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    from imgembed.store import embedded

    data_dir = tmp_path_factory.mktemp("pg")
    url = embedded.start(data_dir)
    yield url
    embedded.stop(data_dir)


@pytest.fixture(params=["postgres", "qdrant"])
def store(request, postgres_url, tmp_path):
    if request.param == "postgres":
        backend = PostgresStore(postgres_url)
    else:
        backend = QdrantStore(path=tmp_path / "qdrant")
    yield backend
    backend.close()


def _name() -> str:
    return f"c_{uuid.uuid4().hex[:8]}"


def _unit(values) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def _records(n=50, seed=0) -> list[Record]:
    rng = np.random.default_rng(seed)
    return [
        Record(f"item-{i}", _unit(rng.normal(size=8)), f"hash-{i}", f"/images/{i}.jpg",
               {"color": ["red", "green", "blue"][i % 3], "shop": "a" if i < 25 else "b"})
        for i in range(n)
    ]  # fmt: skip


def test_collections_and_provenance(store):
    name = _name()
    info = store.create_collection(name, PROV)
    assert (info.name, info.backend, info.provenance, info.count) == (name, store.backend, PROV, 0)
    assert store.create_collection(name, PROV).name == name  # idempotent
    with pytest.raises(ProvenanceMismatchError, match="cannot be mixed"):
        store.create_collection(name, Provenance("ViT-B-32", "openai", 8, "abc123"))
    assert name in [c.name for c in store.collections()]
    store.drop_collection(name)
    with pytest.raises(CollectionNotFoundError):
        store.get_collection(name)


def test_upsert_get_hashes_delete(store):
    name = _name()
    store.create_collection(name, PROV)
    records = _records()
    store.upsert(name, records[:30])
    store.upsert(name, records[20:])  # overlapping ids replace, never duplicate
    assert store.count(name) == 50
    assert store.hashes(name) == {r.id: r.content_hash for r in records}
    (got,) = store.get(name, ["item-7"])
    np.testing.assert_allclose(got.vector, records[7].vector, atol=1e-6)
    assert got.source == "/images/7.jpg" and got.metadata["color"] == "green"
    changed = Record("item-7", records[8].vector, "new-hash", "/images/7b.jpg", {"color": "x"})
    store.upsert(name, [changed])
    assert store.hashes(name)["item-7"] == "new-hash" and store.count(name) == 50
    assert store.delete(name, ["item-1", "item-2", "missing"]) == 2
    assert store.count(name) == 48
    with pytest.raises(StoreError, match="shape"):
        store.upsert(name, [Record("bad", np.ones(3, np.float32), "h", "s")])


def test_search_order_scores_and_filters(store):
    name = _name()
    store.create_collection(name, PROV)
    records = _records()
    store.upsert(name, records)
    query = records[10].vector + 0.05 * records[11].vector
    matrix = np.stack([r.vector for r in records])
    expected = np.argsort(-(matrix @ _unit(query)))[:5]
    hits = store.search(name, query, top_k=5)
    assert [h.id for h in hits] == [records[i].id for i in expected]
    assert hits[0].score == pytest.approx(float(matrix[expected[0]] @ _unit(query)), abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    exact = store.search(name, query, top_k=5, exact=True)
    assert [h.id for h in exact] == [h.id for h in hits]
    red_b = store.search(name, query, top_k=50, filters={"color": "red", "shop": "b"})
    expected_ids = {r.id for r in records if r.metadata == {"color": "red", "shop": "b"}}
    assert {h.id for h in red_b} == expected_ids and len(red_b) == len(expected_ids)
    with pytest.raises(StoreError, match="dimensions"):
        store.search(name, np.ones(4), top_k=1)


def test_migrations_are_at_head_and_rerunnable(postgres_url):
    PostgresStore(postgres_url).close()
    PostgresStore(postgres_url).close()  # a second upgrade is a no-op
    current, head = revisions(postgres_url)
    assert current == head == "0002"


def test_hnsw_index_serves_the_search(postgres_url):
    import psycopg

    store = PostgresStore(postgres_url)
    name = _name()
    store.create_collection(name, PROV)
    store.upsert(name, _records(n=2000))  # on a few hundred rows a sort is cheaper
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("ANALYZE imgembed_items")
        plan = connection.execute(
            f"EXPLAIN SELECT id FROM imgembed_items WHERE collection = '{name}' "
            "ORDER BY embedding::vector(8) <=> '[1,0,0,0,0,0,0,0]'::vector(8) LIMIT 5"
        ).fetchall()
    assert "imgembed_hnsw_" in " ".join(row[0] for row in plan)
    store.close()


def _write(url: str, name: str, start: int, queue) -> None:
    store = PostgresStore(url)
    records = _records(n=200)
    for i in range(start, 200, 20):
        store.upsert(name, records[i : i + 20])  # overlapping batches from two processes
    store.close()
    queue.put("done")


def test_concurrent_writers(postgres_url):
    store = PostgresStore(postgres_url)
    name = _name()
    store.create_collection(name, PROV)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    writers = [context.Process(target=_write, args=(postgres_url, name, s, queue)) for s in (0, 10)]
    for writer in writers:
        writer.start()
    assert [queue.get(timeout=120) for _ in writers] == ["done", "done"]
    for writer in writers:
        writer.join(timeout=30)
        assert writer.exitcode == 0
    assert store.count(name) == 200
    assert store.hashes(name) == {r.id: r.content_hash for r in _records(n=200)}
    store.close()
