"""Both vector stores against real backends: the embedded PostgreSQL (pgvector) and Qdrant's
local mode. Same contract: collections and provenance, upsert, search order, filters."""

import contextlib
import multiprocessing
import threading
import time
import uuid

import numpy as np
import pytest

from imgembed.errors import (
    CollectionNotFoundError,
    InvalidRecordError,
    ProvenanceMismatchError,
    StoreBusyError,
    StoreError,
)
from imgembed.store import Provenance, Record
from imgembed.store.base import StoredItem
from imgembed.store.postgres import SCHEMA, PostgresStore, items_table, revisions
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
    for bad in ("a/b", " ", "tab\there", ""):
        with pytest.raises(InvalidRecordError, match="collection name"):
            store.create_collection(bad, PROV)
    for dots in (".", ".."):  # HTTP clients resolve them away: no route could name them
        with pytest.raises(InvalidRecordError, match="name no collection in a URL path"):
            store.create_collection(dots, PROV)
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
    stored = store.stored_items(name)  # what a rerun of `index` compares, without vectors
    assert stored["item-7"] == StoredItem("new-hash", "/images/7b.jpg", {"color": "x"})
    assert stored["item-8"].metadata == {"color": "blue", "shop": "a"} and len(stored) == 50
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


def test_a_query_of_any_scale_finds_what_its_direction_finds(store):
    """The cosine ignores a query's length; PostgreSQL's half-precision index read tiny
    values as zeros (another order, silently) and refused values over 65,504."""
    name = _name()
    store.create_collection(name, PROV)
    records = _records()
    store.upsert(name, records)
    query = records[3].vector.astype(np.float64)
    expected = store.search(name, query, top_k=5)
    for scale in (1e5, 1e19, 1e-30, 1e-300):
        hits = store.search(name, query * scale, top_k=5)
        assert [h.id for h in hits] == [h.id for h in expected], scale
        assert [h.score for h in hits] == pytest.approx([h.score for h in expected], abs=1e-5)


def test_filters_of_every_json_type_match_keys_exactly(store):
    """A filter's value may be any JSON (the HTTP API sends numbers, `--filter k:=JSON` null,
    lists, objects) and its key any text (a CSV header with a space or a dot). Qdrant raised
    pydantic's ValidationError for a float, null, list or object (HTTP 500, a CLI traceback)
    and read a key as a path of its own ("product type": a StoreError, "a.b": key b of a)."""
    name = _name()
    store.create_collection(name, PROV)
    records = _records(n=6)
    for i, record in enumerate(records):
        record.metadata = {"price": i * 1.5, "count": 3.0 if i == 2 else i,
                           "none": None if i == 3 else 1, "sizes": [i, i + 1], "dims": {"w": i},
                           "product type": f"t{i % 2}", "a.b": f"v{i}", "a": {"b": "v4"},
                           "c[]": i}  # fmt: skip
    store.upsert(name, records)
    query = records[0].vector
    expected = {
        "price": (4.5, {"item-3"}),
        "count": (3, {"item-2", "item-3"}),  # 3 is 3.0, as JSON numbers compare
        "none": (None, {"item-3"}),
        "sizes": ([2, 3], {"item-2"}),
        "dims": ({"w": 4}, {"item-4"}),
        "product type": ("t1", {"item-1", "item-3", "item-5"}),
        "a.b": ("v1", {"item-1"}),
        "c[]": (5, {"item-5"}),
    }
    for key, (value, ids) in expected.items():
        hits = store.search(name, query, top_k=10, filters={key: value})
        assert {hit.id for hit in hits} == ids, key
    # an empty list or object names nothing to match (PostgreSQL matched any list or object
    # there, Qdrant every item)
    for empty in ({"sizes": []}, {"dims": {}}, {"a": {"b": []}}):
        with pytest.raises(InvalidRecordError, match="is empty: give a value"):
            store.search(name, query, top_k=10, filters=empty)
    # one value also finds a list that holds it (tags=sale: ["sale", "new"]); PostgreSQL's
    # containment found none, Qdrant both
    hits = store.search(name, query, top_k=10, filters={"sizes": 2, "product type": "t0"})
    assert {hit.id for hit in hits} == {"item-2"}


def test_one_value_inside_an_object_also_finds_a_list_holding_it(store):
    """The filter's "one value also finds a list that holds it" at any depth, as Qdrant
    matches a path: {"product": {"tags": "sale"}} finds {"product": {"tags": ["sale"]}}.
    PostgreSQL applied it to the top-level keys only (found none there, Qdrant one)."""
    name = _name()
    store.create_collection(name, PROV)
    records = _records(n=4)
    for record, product in zip(records, (
        {"tags": ["sale", "new"], "shop": "a"}, {"tags": "sale", "shop": "b"},
        {"tags": ["new"], "shop": "a"}, {"tags": "sale", "size": {"w": [2, 3]}},
    ), strict=True):  # fmt: skip
        record.metadata = {"product": product}
    store.upsert(name, records)
    for wanted, ids in (
        ({"tags": "sale"}, {"item-0", "item-1", "item-3"}),
        ({"tags": "sale", "shop": "a"}, {"item-0"}),
        ({"tags": ["sale", "new"]}, {"item-0"}),
        ({"size": {"w": 3}}, {"item-3"}),
    ):
        hits = store.search(name, records[0].vector, top_k=10, filters={"product": wanted})
        assert {hit.id for hit in hits} == ids, wanted


def test_migrations_are_at_head_and_rerunnable(postgres_url):
    PostgresStore(postgres_url).close()
    PostgresStore(postgres_url).close()  # a second upgrade is a no-op
    current, head = revisions(postgres_url)
    assert current == head == SCHEMA


def _plan(url: str, statement: str) -> str:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        return " ".join(row[0] for row in connection.execute(f"EXPLAIN {statement}"))


def test_hnsw_index_serves_the_search_and_exact_search_scans(postgres_url):
    from imgembed.store.postgres import items_table

    store = PostgresStore(postgres_url)
    name = _name()
    store.create_collection(name, PROV)
    store.upsert(name, _records(n=2000))  # on a few hundred rows a sort is cheaper
    store.refresh(name)
    table = items_table(name)
    probe = "'[1,0,0,0,0,0,0,0]'"
    approximate = _plan(postgres_url, f"SELECT id FROM {table} ORDER BY "
                        f"embedding::halfvec(8) <=> {probe}::halfvec(8) LIMIT 5")  # fmt: skip
    assert f"Index Scan using {table}_hnsw" in approximate
    exact = _plan(postgres_url, f"SELECT id FROM {table} ORDER BY embedding <=> {probe} LIMIT 5")
    assert "Seq Scan" in exact and "hnsw" not in exact
    # and the store's own answers: approximate finds the exact top 5 on this easy set
    query = _unit([1, 0, 0, 0, 0, 0, 0, 0])
    found = [hit.id for hit in store.search(name, query, top_k=5)]
    assert found == [hit.id for hit in store.search(name, query, top_k=5, exact=True)]
    store.close()


def test_a_filtered_search_walks_the_graph_until_k_rows_match(postgres_url):
    """Unfiltered searches run without iterative scans (faster); a filter that drops two
    candidates in three still gets its k rows from the index, then unfiltered ones again."""
    from imgembed.store.postgres import items_table

    store = PostgresStore(postgres_url)
    name = _name()
    store.create_collection(name, PROV)
    store.upsert(name, _records(n=10_000))  # enough rows for the planner to use the index
    store.refresh(name)
    table, probe = items_table(name), "'[1,0,0,0,0,0,0,0]'"
    plan = _plan(postgres_url, f"SELECT id FROM {table} WHERE metadata @> "
                 f"""'{{"color": "red"}}' ORDER BY embedding::halfvec(8) <=> """
                 f"{probe}::halfvec(8) LIMIT 80")  # fmt: skip
    assert f"Index Scan using {table}_hnsw" in plan
    query = _unit([1, 0, 0, 0, 0, 0, 0, 0])
    before = [hit.id for hit in store.search(name, query, top_k=5)]
    red = store.search(name, query, top_k=80, filters={"color": "red"})  # ef_search 160
    exact = store.search(name, query, top_k=80, filters={"color": "red"}, exact=True)
    assert len(red) == 80 and {hit.metadata["color"] for hit in red} == {"red"}
    assert len({hit.id for hit in red} & {hit.id for hit in exact}) >= 72
    assert [hit.id for hit in store.search(name, query, top_k=5)] == before
    many = store.search(name, query, top_k=1500)  # more than pgvector's ef_search limit
    assert len(many) == 1500 and len({hit.id for hit in many}) == 1500
    store.close()


def _index_exists(url: str, name: str) -> bool:
    import psycopg

    from imgembed.store.postgres import items_table

    with psycopg.connect(url) as connection:
        row = connection.execute("SELECT to_regclass(%s)", (f"{items_table(name)}_hnsw",))
        return row.fetchone()[0] is not None


def test_a_bulk_load_builds_its_index_afterwards(postgres_url):
    store = PostgresStore(postgres_url, defer_index_min=100)
    name = _name()
    store.create_collection(name, PROV)
    assert _index_exists(postgres_url, name)
    assert store.bulk_load(name, 40) is False  # below the minimum: the index is maintained
    assert store.bulk_load(name, 300) is True
    assert not _index_exists(postgres_url, name)
    records = _records(n=300)
    for start in range(0, 300, 100):
        store.upsert(name, records[start : start + 100])
    query = records[7].vector
    assert store.search(name, query, top_k=1)[0].id == "item-7"  # meanwhile: exact scans
    store.close()
    # the run stopped before building it: the next refresh (any later run's end) does, not
    # the next run's start (on the shared connection: every search would wait for it)
    store = PostgresStore(postgres_url, defer_index_min=100)
    store.create_collection(name, PROV)
    assert not _index_exists(postgres_url, name)
    store.refresh(name)
    assert _index_exists(postgres_url, name)
    assert store.search(name, query, top_k=1)[0].id == "item-7"
    # a load of less than half again what the collection holds keeps its index up to date
    assert store.bulk_load(name, 140) is False and _index_exists(postgres_url, name)
    assert store.bulk_load(name, 150) is True
    store.refresh(name)
    assert _index_exists(postgres_url, name)
    assert PostgresStore(postgres_url, defer_index_min=0).bulk_load(name, 10**6) is False
    store.close()


def waits_for_lock(url: str, statement: str) -> None:
    """Until a session runs `statement` (a part of it) and waits for a lock."""
    import psycopg

    deadline = time.monotonic() + 30
    query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s"
    with psycopg.connect(url, autocommit=True) as admin:
        while not admin.execute(query, (f"%{statement}%",)).fetchone()[0]:
            assert time.monotonic() < deadline, f"no {statement} waits"
            time.sleep(0.02)


@contextlib.contextmanager
def index_builds_held(url: str, table: str):
    """Another session's open transaction on `table`: an index build on it waits until the
    block ends, as a build over a large collection takes minutes. Yields a function that
    waits until a build is waiting."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url) as blocker:
        lock = sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(sql.Identifier(table))
        blocker.execute(lock)
        try:
            yield lambda: waits_for_lock(url, "CREATE INDEX")
        finally:
            blocker.rollback()


def answered_within(call, seconds: float = 30.0) -> list:
    """[call()] if it returned within `seconds` (in a thread), else []."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    return result


def test_an_index_build_holds_no_search_of_another_collection(postgres_url):
    """A build (about a minute per 100k items) runs on a connection of its own: meanwhile the
    same store object, as a server shares it between jobs and requests, answers searches."""
    store = PostgresStore(postgres_url, defer_index_min=100)
    built, other = _name(), _name()
    for name in (built, other):
        store.create_collection(name, PROV)
    records = _records()
    store.upsert(other, records)
    assert store.bulk_load(built, 300)
    store.upsert(built, _records(n=300, seed=1))
    with index_builds_held(postgres_url, items_table(built)) as build_waits:
        building = threading.Thread(target=store.refresh, args=(built,), daemon=True)
        building.start()
        build_waits()
        found = answered_within(lambda: store.search(other, records[3].vector, top_k=1))
        assert found and found[0][0].id == "item-3"
        assert store.count(built) == 300
        assert building.is_alive()  # the build still waits
        # a delete behind the build would hold the shared connection too: it gives up

        def delete():
            try:
                return store.delete(built, ["item-1"])
            except StoreBusyError as exc:
                return exc

        refused: list = []
        waiting = threading.Thread(target=lambda: refused.append(delete()), daemon=True)
        waiting.start()
        waits_for_lock(postgres_url, "DELETE FROM")
        found = answered_within(lambda: store.search(other, records[3].vector, top_k=1), 3.0)
        assert found, "a search waited behind the delete"  # which waits up to 5 s
        waiting.join(30)
        assert refused and "another session held what it needed" in str(refused[0])
    building.join(60)
    assert not building.is_alive() and _index_exists(postgres_url, built)
    assert store.delete(built, ["item-1"]) == 1
    store.close()


class _Stopped(Exception):
    pass


def test_a_build_stops_within_a_second_when_its_job_does(postgres_url):
    """A build of minutes, or one waiting for other sessions, is cancelled when its caller's
    `waiting` raises (a job cancelled, a server shutting down): the job does not wait for
    the build's end. Nothing half-built is left; the next refresh builds the index."""
    store = PostgresStore(postgres_url, defer_index_min=100)
    name = _name()
    store.create_collection(name, PROV)
    assert store.bulk_load(name, 300)
    store.upsert(name, _records(n=300, seed=1))
    asked: list[str] = []
    stop = threading.Event()

    def waiting(what: str) -> None:
        asked.append(what)
        if stop.is_set():
            raise _Stopped(what)

    def build() -> None:
        try:
            store.refresh(name, waiting=waiting)
        except _Stopped as exc:
            outcome.append(exc)

    outcome: list[_Stopped] = []
    with index_builds_held(postgres_url, items_table(name)) as build_waits:
        building = threading.Thread(target=build, daemon=True)
        building.start()
        build_waits()
        stop.set()
        building.join(30)  # the other session still holds the table: it would wait for ever
        assert not building.is_alive() and outcome, "the build went on after its job stopped"
    assert asked[0] == f"building the search index of {name!r}"
    assert not _index_exists(postgres_url, name)
    store.refresh(name)
    assert _index_exists(postgres_url, name) and store.count(name) == 300
    store.close()


def test_a_stop_between_two_statements_still_stops_the_next(postgres_url):
    """The server drops a cancel that reaches an idle connection: a stop asked for between
    two statements of long work must still stop the next one (a build of minutes)."""
    store = PostgresStore(postgres_url)
    asked = threading.Event()

    def waiting(what: str) -> None:
        asked.set()
        raise _Stopped(what)

    def work(connection) -> str:
        connection.execute("SELECT 1")
        asked.wait(30)
        time.sleep(0.3)  # the first cancel came while the connection was idle
        connection.execute("SELECT pg_sleep(30)")
        return "went on to the end"

    started = time.monotonic()
    with pytest.raises(_Stopped):
        store._db.alone("building", work, waiting=waiting)
    assert time.monotonic() - started < 20
    store.close()


def test_equal_ids_in_one_batch_the_last_wins(postgres_url):
    store = PostgresStore(postgres_url)
    name = _name()
    store.create_collection(name, PROV)
    first, second = _records(n=2)
    second.id = first.id
    store.upsert(name, [first, second])
    (kept,) = store.get(name, [first.id])
    assert kept.content_hash == second.content_hash and kept.metadata == second.metadata
    np.testing.assert_allclose(kept.vector, second.vector, rtol=1e-6)
    store.close()


def test_a_collection_made_again_elsewhere_with_another_dimension_is_followed(postgres_url):
    """A long-lived store (the HTTP service, the resident search process) keeps each
    collection's table and dimension; another process may drop and make it again with
    another model meanwhile."""
    kept, other = PostgresStore(postgres_url), PostgresStore(postgres_url)
    name = _name()
    kept.create_collection(name, PROV)
    kept.upsert(name, _records(n=5))
    assert len(kept.search(name, _records(n=1)[0].vector, 3)) == 3
    other.drop_collection(name)
    other.create_collection(name, Provenance("m2", "w", 4, "p"))
    four = [Record(f"x{i}", _unit(np.eye(4)[i] + 0.1), f"h{i}", f"/x/{i}.jpg") for i in range(4)]
    other.upsert(name, four[:2])
    kept.upsert(name, four[2:])  # with the new dimension, not "the collection has 8"
    hits = kept.search(name, four[3].vector, 4)
    assert hits[0].id == "x3" and len(hits) == 4
    kept.close()
    other.close()


def test_a_collection_that_is_not_there_is_collection_not_found(store):
    """Every call on an unknown collection says so (Qdrant's client used to surface as a
    plain StoreError "ValueError: Collection ... not found")."""
    vector = _records(n=1)[0].vector
    for call in (
        lambda: store.upsert("nope", _records(n=2)),
        lambda: store.get("nope", ["item-0"]),
        lambda: store.hashes("nope"),
        lambda: store.stored_items("nope"),
        lambda: store.delete("nope", ["item-0"]),
        lambda: store.count("nope"),
        lambda: store.search("nope", vector, 3),
    ):
        with pytest.raises(CollectionNotFoundError, match="no collection 'nope'"):
            call()


def test_a_collection_dropped_by_another_process_meanwhile_is_collection_not_found(
    postgres_url,
):
    """A long-lived store knows the collection's table; another process drops it during a
    job: the next call says the collection is gone (it was a raw "UndefinedTable")."""
    working, other = PostgresStore(postgres_url), PostgresStore(postgres_url)
    vector = _records(n=1)[0].vector
    for call in (
        lambda name: working.upsert(name, _records(n=2)),
        lambda name: working.get(name, ["item-0"]),
        lambda name: working.hashes(name),
        lambda name: working.delete(name, ["item-0"]),
        lambda name: working.count(name),
        lambda name: working.search(name, vector, 3),
        lambda name: working.refresh(name),
    ):
        name = _name()
        working.create_collection(name, PROV)
        working.upsert(name, _records(n=5))
        other.drop_collection(name)
        with pytest.raises(CollectionNotFoundError, match="it was dropped") as caught:
            call(name)
        assert "UndefinedTable" not in str(caught.value)
        with pytest.raises(CollectionNotFoundError, match="no collection"):
            call(name)  # read again: not there
    working.close()
    other.close()


def test_a_run_whose_connection_was_lost_takes_its_lock_again_or_stops(postgres_url):
    """One run per collection holds a session lock. Its connection lost and made again, it
    takes the lock again (a second run is still refused); if a second run took it while it
    was gone, the first stops with StoreBusyError instead of both writing."""
    import psycopg

    first, second = PostgresStore(postgres_url), PostgresStore(postgres_url)
    name = _name()
    first.create_collection(name, PROV)

    def cut(store):  # as a restart or a network blip would
        pid = store._db._connection.info.backend_pid
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    with first.writing(name):
        cut(first)
        first.upsert(name, _records(n=3))  # reconnects, takes the lock again, stores
        with pytest.raises(StoreBusyError, match="another indexing run"):
            second.check_not_busy(name)
        cut(first)
        deadline = time.monotonic() + 30
        while True:  # the lost session's lock goes with it, once its server process exits
            try:
                second.check_not_busy(name)
                break
            except StoreBusyError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with second.writing(name):
            with pytest.raises(StoreBusyError, match="went with its lost database connection"):
                first.upsert(name, _records(n=5))
            assert first.count(name) == 3  # nothing of the refused batch was stored
    first.close()
    second.close()


def test_a_run_ending_while_another_thread_reconnects_waits_for_it(postgres_url, monkeypatch):
    """A server shares one connection: a run may end (let its lock go) while another call
    makes the lost connection again and takes the held locks again. The ending waits for
    that, so the reconnect sees the lock list it started with: here the lock was taken by
    another session meanwhile, and the call gets the typed StoreBusyError (before: KeyError)."""
    import psycopg

    from imgembed.store import pgconn

    store = PostgresStore(postgres_url)
    db = store._db
    key = f"test-lock-{uuid.uuid4().hex}"
    held, leave, ended = threading.Event(), threading.Event(), threading.Event()
    retaking, go_on = threading.Event(), threading.Event()
    try_lock = pgconn._try_lock

    def slow_try_lock(connection, name):  # the reconnect taking the lock again, held up
        if held.is_set():
            retaking.set()
            go_on.wait(30)
        return try_lock(connection, name)

    def run_that_ends():
        with db.session_lock(key, "locking", lambda: StoreBusyError("busy")):
            held.set()
            leave.wait(30)
        ended.set()

    monkeypatch.setattr(pgconn, "_try_lock", slow_try_lock)
    running = threading.Thread(target=run_that_ends, daemon=True)
    running.start()
    assert held.wait(30)
    outcome: list = []
    with psycopg.connect(postgres_url, autocommit=True) as other:
        pid = db._connection.info.backend_pid
        other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        while other.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            time.sleep(0.05)
        taken = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
        assert other.execute(taken, (key,)).fetchone()[0]
        call = threading.Thread(
            target=lambda: outcome.append(raised(db.run, "reading", lambda c: 1)), daemon=True
        )
        call.start()
        assert retaking.wait(30)
        leave.set()
        time.sleep(0.5)  # the run's end would go on now if it did not wait
        assert not ended.is_set()
        go_on.set()
        call.join(30)
        running.join(30)
    assert ended.is_set() and len(outcome) == 1
    assert isinstance(outcome[0], StoreBusyError), outcome
    assert "went with its lost database connection" in str(outcome[0])
    store.close()


def raised(call, *args, **kwargs):
    """What `call` returned, or the exception it raised (for a test to look at)."""
    try:
        return call(*args, **kwargs)
    except Exception as exc:
        return exc


def test_a_ragged_query_or_record_is_an_invalid_record(store):
    name = _name()
    store.create_collection(name, PROV)
    ragged = [[1.0, 2.0], [3.0]]
    with pytest.raises(InvalidRecordError, match="not a vector of numbers"):
        store.search(name, ragged, 3)
    with pytest.raises(InvalidRecordError, match="not a vector of numbers"):
        store.upsert(name, [Record("r", ragged, "h", "/r.jpg")])
    huge = [10**400] + [1] * 7  # a Python int no float holds: was a bare OverflowError
    with pytest.raises(InvalidRecordError, match="not a vector of numbers"):
        store.search(name, huge, 3)
    with pytest.raises(InvalidRecordError, match="not a vector of numbers"):
        store.upsert(name, [Record("r", huge, "h", "/r.jpg")])


def test_names_qdrant_cannot_hold_are_invalid_records(tmp_path):
    """Names PostgreSQL takes but Qdrant refuses (its characters, a folder's '.', over 255
    bytes, our registry) were a plain StoreError with the client's words: HTTP 503 as if
    the store were down. Now they are the request's fault, as other bad names are (422)."""
    store = QdrantStore(path=tmp_path / "q")
    for bad, why in [("a:b", "no :"), ("what?*", r"no \* \?"), ('"x"', 'no "'), ("..", "URL path"),
                     (".", "URL path"), ("x" * 256, "255 bytes"), ("é" * 128, "255 bytes"),
                     ("imgembed_collections", "registry")]:  # fmt: skip
        with pytest.raises(InvalidRecordError, match=f"collection name .*{why}"):
            store.create_collection(bad, PROV)
    assert store.collections() == []
    assert store.create_collection("é" * 127, PROV).count == 0  # 254 bytes
    store.close()


def test_threads_sharing_local_qdrant_files_lose_nothing(tmp_path):
    """A server's store threads and its index jobs share one store. qdrant-client's local
    mode shares one SQLite connection and its arrays between them: calls at the same time
    failed ("cannot start a transaction within a transaction", IndexError in a search:
    503s) and left a collection whose every later count raised "operands could not be
    broadcast together"."""
    store = QdrantStore(path=tmp_path / "q")
    name = _name()
    store.create_collection(name, PROV)
    records = _records(n=600)
    failed: list[BaseException] = []

    def each(call, times):
        def run():
            for i in range(times):
                try:
                    call(i)
                except Exception as exc:
                    failed.append(exc)

        return threading.Thread(target=run)

    def churn(i):
        other = f"{name}-other"
        store.create_collection(other, PROV)
        store.upsert(other, records[i : i + 1])
        assert other in [c.name for c in store.collections()]
        store.drop_collection(other)

    threads = [
        *(each(lambda i, w=w: store.upsert(name, records[w * 200 + i * 10 :][:10]), 20)
          for w in range(3)),
        *(each(lambda i: store.search(name, records[i].vector, 5, {"color": "red"}), 60)
          for _ in range(2)),
        each(lambda i: store.count(name), 60),
        each(churn, 10),
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failed == []
    assert store.count(name) == 600
    store.close()
    store = QdrantStore(path=tmp_path / "q")
    assert store.hashes(name) == {r.id: r.content_hash for r in records}
    assert [c.name for c in store.collections()] == [name]
    store.close()


def test_a_qdrant_drop_cut_short_leaves_the_other_collections_listed(tmp_path):
    """A Qdrant drop is two steps (the collection, then its registry entry); a crash between
    them, or another process's drop during a listing, left a name without its collection:
    every listing (`imgembed collections`, GET /collections) then failed with "no
    collection 'a'" (404), and neither a drop nor a new model could clear it."""
    store = QdrantStore(path=tmp_path / "q")
    for name in ("a", "b"):
        store.create_collection(name, PROV)
        store.upsert(name, _records(n=3))
    store._client.delete_collection("a")  # as a drop killed between its two steps leaves it
    assert [c.name for c in store.collections()] == ["b"]
    store.drop_collection("a")  # ends the drop
    with pytest.raises(CollectionNotFoundError):
        store.drop_collection("a")
    store._client.delete_collection("b")
    other = Provenance("m2", "w", 4, "p")  # made again with another model: not "cannot be mixed"
    assert store.create_collection("b", other).provenance == other
    assert [(c.name, c.count) for c in store.collections()] == [("b", 0)]
    store.close()


def test_a_qdrant_dimension_that_no_longer_holds_is_read_again(tmp_path):
    """What a Qdrant server shared by several processes can leave in one of them (a local
    folder has one user at a time): a cached dimension from before the collection was made
    again."""
    store = QdrantStore(path=tmp_path / "q")
    name = _name()
    store.create_collection(name, Provenance("m2", "w", 4, "p"))
    store._dimensions[name] = 8  # as it was before another process made it again
    four = [Record(f"x{i}", _unit(np.eye(4)[i] + 0.1), f"h{i}", f"/x/{i}.jpg") for i in range(4)]
    store.upsert(name, four)
    assert store.search(name, four[3].vector, 4)[0].id == "x3"
    store.close()


def test_the_embedded_server_runs_with_its_settings(postgres_url):
    import psycopg

    from imgembed.store import embedded

    with psycopg.connect(postgres_url) as connection:
        for key, value in embedded.settings().items():
            shown = connection.execute(f"SHOW {key}").fetchone()[0]
            assert shown == value.replace("1024MB", "1GB"), key


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


def test_migration_0003_moves_items_into_a_table_per_collection_and_back(tmp_path):
    import psycopg
    from alembic import command
    from pgvector.psycopg import register_vector
    from psycopg.types.json import Jsonb

    from imgembed.store import embedded
    from imgembed.store.postgres import _alembic_config

    url = embedded.start(tmp_path)
    try:
        command.upgrade(_alembic_config(url), "0002")  # the schema of the previous release
        records = _records(n=30)
        with psycopg.connect(url) as connection:
            register_vector(connection)
            for name, dimension in (("photos", 8), ("wide", 3)):
                connection.execute(
                    "INSERT INTO imgembed_collections (name, model, pretrained, dimension,"
                    " preprocess) VALUES (%s, 'imgembed-tiny', 'seed:0', %s, 'abc123')",
                    (name, dimension),
                )
            for r in records:
                connection.execute(
                    "INSERT INTO imgembed_items (collection, id, embedding, content_hash, source,"
                    " metadata) VALUES ('photos', %s, %s, %s, %s, %s)",
                    (r.id, r.vector, r.content_hash, r.source, Jsonb(r.metadata)),
                )
            connection.execute(
                "INSERT INTO imgembed_items (collection, id, embedding, content_hash, source)"
                " VALUES ('wide', 'w', '[1,2,3]', 'h', 's')"
            )

        store = PostgresStore(url)  # upgrades to the head
        assert revisions(url)[0] == SCHEMA
        assert {c.name: c.count for c in store.collections()} == {"photos": 30, "wide": 1}
        assert store.hashes("photos") == {r.id: r.content_hash for r in records}
        (got,) = store.get("photos", ["item-3"])
        np.testing.assert_allclose(got.vector, records[3].vector, rtol=1e-6)
        assert got.metadata == records[3].metadata
        hits = store.search("photos", records[3].vector, top_k=3, filters={"color": "red"})
        assert hits[0].id == "item-3" and hits[0].score == pytest.approx(1, abs=1e-5)
        assert _index_exists(url, "photos")
        store.close()
        with psycopg.connect(url) as connection:
            assert connection.execute("SELECT to_regclass('imgembed_items')").fetchone()[0] is None

        command.downgrade(_alembic_config(url), "0002")
        with psycopg.connect(url) as connection:
            rows = connection.execute(
                "SELECT collection, count(*) FROM imgembed_items GROUP BY 1 ORDER BY 1"
            ).fetchall()
        assert rows == [("photos", 30), ("wide", 1)]
    finally:
        embedded.stop(tmp_path)
