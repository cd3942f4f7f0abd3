"""The catalogue on the embedded Postgres: scores of a real search equal the fusion formula
computed from the separate vectors (also over 2,000 dimensions; indexes in half precision);
incremental and resumable embedding; failures recorded and retried; provenance."""

import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from imgembed.catalog import Catalog, findly_table, importer, load_weights
from imgembed.catalog.jobs import NoEvents
from imgembed.catalog.product_indexes import INDEX_DDL, PARTS, index_name
from imgembed.catalog.records import FailedProduct, StoreProvenance
from imgembed.catalog.repository import ProductRepository
from imgembed.catalog.text_api import OpenAIEmbedder
from imgembed.errors import (
    CollectionNotFoundError,
    ConfigurationError,
    ProvenanceMismatchError,
    StoreBusyError,
    StoreUnavailableError,
    TextEmbeddingError,
)
from imgembed.store import embedded, pgconn
from imgembed.store.postgres import revisions
from tests.cli import run
from tests.conftest import TINY
from tests.integration.embedding_server import EmbeddingServer
from tests.integration.test_faults_store import CutAtCommit, _drop_imgembed_connections
from tests.integration.test_stores import answered_within, index_builds_held, raised

REPO = Path(__file__).resolve().parents[2]
TABLE = findly_table()


def _products(photos):
    """One product per photo, categories spread over the table, and two without an image."""
    categories = ["fashion", "kleding", "interieur", "tech", "sieraden", None]
    rows = [
        {
            "id": f"p{n}",
            "title": f"{photo.stem.replace('_', ' ')} print",
            "price": 10 + n,
            "description": f"A photo of {photo.stem}",
            "category": categories[n % 6],
            "image_url": str(photo),
        }
        for n, photo in enumerate(photos)
    ]
    rows.append({"id": "gift", "title": "Gift card", "category": "tech", "price": 25})
    rows.append({"id": "book", "title": "Photo book", "category": "fashion", "price": 5})
    return rows


def _vectors(catalog, store_id):
    """product_id -> (text, image or None, combined, image weight, text weight), read back."""
    with psycopg.connect(catalog.repository.url) as connection:
        register_vector(connection)
        rows = connection.execute(
            "SELECT product_id, text_embedding, image_embedding, combined_embedding, image_weight,"
            " text_weight FROM imgembed_products WHERE store_id = %s",
            (store_id,),
        ).fetchall()

    def array(value):
        return None if value is None else np.asarray(value.to_numpy(), dtype=np.float64)

    return {r[0]: (array(r[1]), array(r[2]), array(r[3]), r[4], r[5]) for r in rows}


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _check_scores(hits, stored, q_image, q_text):
    """Each hit's score from the database equals w_img*cos_img + w_txt*cos_txt computed here
    from the stored separate vectors, and the order is the exact order of that formula."""
    formula = {}
    for product_id, (text, image, _, w_image, w_text) in stored.items():
        cos_image = 0.0 if image is None else float(_unit(image) @ _unit(q_image))
        formula[product_id] = w_image * cos_image + w_text * float(_unit(text) @ _unit(q_text))
    assert [hit.rank for hit in hits] == list(range(1, len(hits) + 1))
    for hit in hits:
        assert hit.ranked_by == "combined"
        assert hit.score == pytest.approx(formula[hit.product_id], abs=1e-6), hit.product_id
        assert (hit.image_weight, hit.text_weight) == stored[hit.product_id][3:]
        text, image, *_ = stored[hit.product_id]
        assert hit.text_score == pytest.approx(float(_unit(text) @ _unit(q_text)), abs=1e-6)
        if image is None:
            assert hit.image_score is None and hit.text_only
        else:
            assert hit.image_score == pytest.approx(float(_unit(image) @ _unit(q_image)), abs=1e-6)
    best = sorted(formula, key=lambda pid: -formula[pid])[: len(hits)]
    assert [hit.product_id for hit in hits] == best


def test_search_scores_equal_the_formula_from_the_separate_vectors(data_dir, photos):
    with Catalog(**TINY) as catalog:  # tiny CLIP (text tower) + MiniLM (the default)
        report = catalog.upsert_products("shop", _products(photos))
        assert (report.inserted, report.bad_rows) == (len(photos) + 2, [])
        stats = catalog.embed("shop", batch_size=3)
        assert (stats.successful, stats.failed, stats.text_only) == (len(photos) + 2, 0, 2)
        stored = _vectors(catalog, "shop")
        for text, image, combined, w_image, w_text in stored.values():
            assert combined.shape == (64 + 384,)  # concatenated, never averaged or padded
            np.testing.assert_allclose(combined[64:], w_text * _unit(text), atol=1e-6)
            if image is None:
                assert not combined[:64].any()  # text-only: zero image part
            else:
                np.testing.assert_allclose(combined[:64], w_image * _unit(image), atol=1e-6)
        assert stored["p1"][3:] == (0.75, 0.25) and stored["p3"][3:] == (0.55, 0.45)

        query = "a cup of coffee"
        hits = catalog.search("shop", query, top_k=len(stored))
        q_image = catalog.service.embed_text(query)  # clip_text(q)
        q_text = catalog.text_embedder.embed([query])[0]  # txt(q)
        _check_scores(hits, stored, q_image, q_text)

        both = catalog.search("shop", "cat", image=photos[1], top_k=4)  # [img(q) ; txt(q)]
        _check_scores(
            both,
            stored,
            catalog.service.embed_image(photos[1]),
            catalog.text_embedder.embed(["cat"])[0],
        )

        by_image = catalog.search("shop", image=photos[2], top_k=3)  # one part: its own column
        assert by_image[0].product_id == "p2" and by_image[0].ranked_by == "image"
        assert by_image[0].score == pytest.approx(1, abs=1e-5)
        assert all(h.text_score is None and not h.text_only for h in by_image)
        q_photo = catalog.service.embed_image(photos[2])
        for rank, hit in enumerate(by_image, start=1):  # the score is the image cosine
            cosine = float(_unit(stored[hit.product_id][1]) @ _unit(q_photo))
            assert (hit.rank, hit.image_score) == (rank, pytest.approx(cosine, abs=1e-5))
            assert hit.score == pytest.approx(cosine, abs=1e-5)
            assert (hit.image_weight, hit.text_weight) == stored[hit.product_id][3:]

        fashion = catalog.search("shop", query, category="kleding", top_k=10)
        assert {(h.product_id, h.category, h.weight_category) for h in fashion} == {
            ("p0", "fashion", "fashion"),  # each product's own category, and its table's
            ("p1", "kleding", "fashion"),
            ("book", "fashion", "fashion"),
        }
        cheap = catalog.search("shop", query, max_price=12, top_k=10)
        assert {h.product_id for h in cheap} == {"p0", "p1", "p2", "book"}


def test_an_image_search_ranks_by_cosine_when_the_service_does_not_normalise(data_dir, photos):
    """IMGEMBED_NORMALIZE=false: products' image vectors were stored as the model gave them
    (lengths 6.7 to 7.5) and the query's image part too, so a search by a photo ranked by the
    inner product (another photo, of a longer vector, above the same one) and said image
    scores of 51.9 as cosines."""
    with Catalog(**TINY, normalize=False) as catalog:
        assert float(np.linalg.norm(catalog.service.embed_image(photos[2]))) > 2  # raw
        catalog.upsert_products("raw", _products(photos))
        catalog.embed("raw")
        stored = _vectors(catalog, "raw")
        assert all(
            abs(np.linalg.norm(v[1]) - 1) < 1e-5 for v in stored.values() if v[1] is not None
        )
        q_image = catalog.service.embed_image(photos[2])
        by_image = catalog.search("raw", image=photos[2], top_k=len(stored))
        cosines = {
            p: float(_unit(v[1]) @ _unit(q_image)) for p, v in stored.items() if v[1] is not None
        }
        assert [h.product_id for h in by_image] == sorted(cosines, key=lambda p: -cosines[p])
        assert by_image[0].product_id == "p2" and by_image[0].score == pytest.approx(1, abs=1e-5)
        for hit in by_image:
            assert hit.score == pytest.approx(cosines[hit.product_id], abs=1e-5)
            assert hit.image_score == pytest.approx(cosines[hit.product_id], abs=1e-5)
        query = "a cup of coffee"
        both = catalog.search("raw", query, image=photos[2], top_k=len(stored))
        _check_scores(both, stored, q_image, catalog.text_embedder.embed([query])[0])


def test_two_imports_of_the_same_products_at_once_neither_deadlock_nor_miscount(data_dir):
    """A webhook upsert beside a CLI backfill, in opposite orders: each waits for the other
    (rows are written in key order); together they insert every product once."""
    import threading

    ids = [f"d{n:05d}" for n in range(3000)]
    orders = [ids, ids[::-1]]
    reports, errors = [], []
    start = threading.Barrier(2)

    def load(order):
        try:
            with Catalog(**TINY) as catalog:
                start.wait()
                reports.append(catalog.upsert_products("both", [
                    {"id": product_id, "title": f"product {product_id}"} for product_id in order
                ]))  # fmt: skip
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(order,)) for order in orders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == []
    assert sum(r.inserted for r in reports) == len(ids)
    assert all(r.inserted + r.updated + r.unchanged == len(ids) for r in reports)


def test_a_store_id_is_the_same_store_in_every_call(data_dir, photos):
    """Import and embed strip the id's blanks; stats, search and product did not, and said
    the store " ws " had nothing."""
    with Catalog(**TINY) as catalog:
        catalog.upsert_products(" ws ", _products(photos)[:2])
        assert catalog.embed(" ws ").successful == 2
        assert catalog.stats(" ws ").total == catalog.stats("ws").total == 2
        assert len(catalog.search(" ws ", "a rocket", top_k=2)) == 2
        first = _products(photos)[0]["id"]
        assert catalog.product(" ws ", first)["product_id"] == first
        # the command a message gives works when copied: an id with a blank is quoted
        catalog.upsert_products("my store", _products(photos)[:1])
        with pytest.raises(CollectionNotFoundError) as caught:
            catalog.search("my store", "a rocket")
        assert str(caught.value).endswith("imgembed catalog embed --store-id 'my store'")


def test_an_update_sets_what_the_row_names_and_keeps_the_rest(
    data_dir, photos, tmp_path, monkeypatch
):
    """A price feed (id,title,price) left the image, category, description and attributes of
    each product empty; and an image path relative to where the library ran was stored as
    given, so a run from another directory could not find it."""
    photo = photos[0]
    full = {"id": "p1", "title": "Rocket", "description": "A launch", "category": "tech",
            "price": 10, "currency": "EUR", "image_url": str(photo), "brand": "Acme"}  # fmt: skip
    feed = tmp_path / "prices.csv"
    feed.write_text("id,title,price\np1,Rocket,19.95\n")
    with Catalog(**TINY) as catalog:
        catalog.upsert_products("shop", [full])
        assert catalog.embed("shop").successful == 1
        report = catalog.import_file(feed, "shop")
        assert (report.inserted, report.updated) == (0, 1)
        product = catalog.product("shop", "p1")
        assert product["price"] == 19.95
        kept = {k: product[k] for k in ("description", "category", "currency", "image_url")}
        assert kept == {"description": "A launch", "category": "tech", "currency": "EUR",
                        "image_url": str(photo)}  # fmt: skip
        assert product["attributes"] == {"brand": "Acme"}
        # a named part that is empty clears it; other columns replace the attributes
        catalog.upsert_products("shop", [{"id": "p1", "title": "Rocket", "category": None,
                                          "colour": "white"}])  # fmt: skip
        product = catalog.product("shop", "p1")
        assert product["category"] is None and product["image_url"] == str(photo)
        assert product["attributes"] == {"colour": "white"}
        assert catalog.upsert_products("shop", [{"id": "p1", "title": "Rocket"}]).unchanged == 1
        assert catalog.embed("shop").successful == 1  # the text changed: embedded again
        # Shopify's own objects too: a price sync keeps the images, type and vendor
        shopify = {"id": 101, "title": "Mug", "body_html": "<p>A mug</p>", "vendor": "Acme",
                   "product_type": "Kitchen", "variants": [{"price": "9.00"}],
                   "images": [{"src": str(photo), "position": 1}]}  # fmt: skip
        catalog.upsert_products("shop", [shopify])
        sync = {"id": 101, "title": "Mug", "variants": [{"price": "7.50"}]}
        assert catalog.upsert_products("shop", [sync]).updated == 1
        mug = catalog.product("shop", "101")
        assert (mug["price"], mug["category"], mug["description"]) == (7.5, "Kitchen", "A mug")
        assert mug["image_url"] == str(photo) and mug["attributes"] == {"vendor": "Acme"}
        # a relative image path is stored absolute, as the library saw it
        monkeypatch.chdir(photo.parent)
        catalog.upsert_products("shop", [{"id": "p2", "title": "Two", "image": photo.name}])
        monkeypatch.chdir(tmp_path)
        assert catalog.product("shop", "p2")["image_url"] == str(photo)
        assert catalog.embed("shop").successful == 2  # p2 and the mug
        # a row without a title updates a stored product; a new one needs a title
        prices = feed.with_name("only_prices.csv")
        catalog.upsert_products("shop", [{"id": "p9", "title": "Nine"}])
        for feed_text in ("id,price\np9,3\nnew1,4\n", "id,title,price\np9,,3\nnew1,,4\n"):
            catalog.upsert_products("shop", [{"id": "p9", "title": "Nine", "price": 1}])
            prices.write_text(feed_text)  # an empty title cell is no title, never cleared
            only = catalog.import_file(prices, "shop")
            assert (only.updated, [(b.line, b.message) for b in only.bad_rows]) == (
                1,
                [(3, "product new1: no title (a new product needs one: give a title or name)")],
            )
            p9 = catalog.product("shop", "p9")
            assert (p9["title"], p9["price"]) == ("Nine", 3.0)
            assert catalog.product("shop", "new1") is None
        # a row cut short has its missing trailing columns empty, as a row writing them so
        short = feed.with_name("short.csv")
        short.write_text("id,title,price,category,colour\np9,Nine,1,tech,blue\np9b,B,2\n")
        catalog.import_file(short, "shop")
        short.write_text("id,title,price,category,colour\np9,Nine,1\n")
        catalog.import_file(short, "shop")
        nine = catalog.product("shop", "p9")
        assert nine["category"] is None and nine["attributes"] == {}


def test_a_value_the_database_cannot_hold_is_a_bad_row_and_the_others_are_stored(
    data_dir, monkeypatch
):
    import random
    import string

    from imgembed.errors import InvalidRecordError

    rows = [
        {"id": "g1", "title": "good one"},
        {"id": "b1", "title": "bad", "color": "\ud800"},  # a lone surrogate (JSON "\ud800")
        {"id": "b2", "title": "bad", "col\x00or": "x"},
        {"id": "b3", "title": "bad", "size": float("nan")},
        {"id": "".join(random.choices(string.ascii_letters, k=20_000)), "title": "long id"},
        {"id": "b5", "title": "bad", "price": "1" + "0" * 400},
        {"id": "b6", "title": "the database refuses it"},
        {"id": "g2", "title": "good two", "tags": ["a", "b"]},
    ]
    with Catalog(**TINY) as catalog:
        upsert = catalog.repository.upsert_products

        def refusing(store_id, products):  # as the database would, for a value it cannot hold
            if any(p.product_id == "b6" for p in products):
                raise InvalidRecordError("storing products: the database refused a value: x")
            return upsert(store_id, products)

        monkeypatch.setattr(catalog.repository, "upsert_products", refusing)
        report = catalog.upsert_products("odd", rows)
        bad = {row.line: row.message for row in report.bad_rows}
        assert sorted(bad) == [2, 3, 4, 5, 6, 7] and report.inserted == 2, bad
        assert "not valid UTF-8" in bad[2] and "NUL" in bad[3] and "nan" in bad[4]
        assert "longer than 500 characters" in bad[5] and "too large" in bad[6]
        assert "refused a value" in bad[7]
        assert catalog.product("odd", "g1")["title"] == "good one"
        assert catalog.product("odd", "g2")["attributes"] == {"tags": ["a", "b"]}


def test_a_stopped_forced_refresh_goes_on_without_force_and_store_ids_are_routable(
    data_dir, photos
):
    """A forced run with the same models, stopped after its first batch: the rerun without
    --force said "up to date" for the rest, which were never refreshed."""

    class StopAfterOne(NoEvents):
        def batch_done(self, stats):
            raise KeyboardInterrupt

    rows = _products(photos)
    with Catalog(**TINY) as catalog:
        catalog.upsert_products("shop", rows)
        assert catalog.embed("shop").successful == len(rows)
        with pytest.raises(KeyboardInterrupt):
            catalog.embed("shop", mode="force", batch_size=2, events=StopAfterOne())
        attempts = [catalog.product("shop", r["id"])["attempts"] for r in rows]
        assert sorted(attempts) == [1] * (len(rows) - 2) + [2, 2]
        assert catalog.stats("shop").pending == len(rows) - 2
        assert len(catalog.search("shop", "a rocket", top_k=50)) == len(rows)  # still found
        rest = catalog.embed("shop")
        assert (rest.processed, rest.skipped) == (len(rows) - 2, 2)
        assert {catalog.product("shop", r["id"])["attempts"] for r in rows} == {2}
        assert catalog.embed("shop").processed == 0
        # a store id the HTTP routes could not name is refused where stores begin
        for unroutable in ("winkel/1", "..", "winkel\n1", "winkel\x7f"):  # DEL as a line break
            with pytest.raises(ConfigurationError, match="HTTP routes could not name it"):
                catalog.upsert_products(unroutable, rows[:1])
        with pytest.raises(CollectionNotFoundError, match="has no products: import some first"):
            catalog.search("nostore", "a rocket")


def test_models_recorded_by_a_run_that_stored_no_vector_do_not_bind_the_store(data_dir, photos):
    """A first run with other models stored nothing (its text API was down): the store is
    not "embedded with" them, and a run with the usual models needs no --force."""
    with Catalog(model="imgembed-tiny", pretrained="seed:1") as other:
        other.upsert_products("fresh", _products(photos)[:2])
        other.repository.set_provenance("fresh", other.provenance(), "v0", reset=False)
    with Catalog(**TINY) as catalog:
        assert catalog.embed_total("fresh") == 2  # no ProvenanceMismatchError up front
        assert catalog.embed("fresh").successful == 2
        assert catalog.repository.provenance("fresh")[0] == catalog.provenance()
        with (
            Catalog(model="imgembed-tiny", pretrained="seed:1") as other,
            pytest.raises(ProvenanceMismatchError),  # now it has vectors: bound
        ):
            other.embed("fresh")


def test_a_store_with_nothing_to_rank_is_said_not_answered_empty(data_dir, photos, tmp_path):
    """A search that no product could match was answered [] (HTTP 200, exit 0), as if none
    matched: a store whose every product failed, a photo among text-only products. A store
    never embedded was already refused so."""
    gone = [{"id": "a", "title": "Rode jurk", "image_url": str(tmp_path / "gone.jpg")}]
    texts = [r for r in _products(photos) if "image_url" not in r]
    with Catalog(**TINY) as catalog:
        catalog.upsert_products("failed", gone)
        assert catalog.embed("failed").failed == 1  # provenance recorded, no vector
        with pytest.raises(CollectionNotFoundError, match="has no embedded products yet"):
            catalog.search("failed", "jurk")
        catalog.upsert_products("texts", texts)
        assert catalog.embed("texts").text_only == len(texts)
        assert len(catalog.search("texts", "gift")) == len(texts)
        with pytest.raises(CollectionNotFoundError, match="has an image embedding"):
            catalog.search("texts", image=photos[0])
        assert catalog.search("texts", "gift", max_price=1) == []  # none matches: no error


def test_search_arguments_the_library_cannot_use_are_refused(data_dir, photos):
    """The CLI and HTTP refused these before the library saw them; the library answered NaN
    with every product, -1 with none, and text or a list with an untyped exception."""
    rows = [*_products(photos), {"id": "pin", "title": "Enamel pin", "price": 4.49}]
    with Catalog(**TINY) as catalog:
        catalog.upsert_products("limits", rows)
        catalog.embed("limits")
        refused = [
            ({"max_price": float("nan")}, "max_price: price nan is not a number"),
            ({"max_price": -1}, "max_price: price -1 must be 0 or more"),
            ({"max_price": "cheap"}, "max_price: price 'cheap' is not a number"),
            ({"max_price": [10]}, "is not a number"),
            ({"category": 5}, "category must be text, not int"),
        ]
        for arguments, message in refused:
            with pytest.raises(ConfigurationError, match=re.escape(message)):
                catalog.search("limits", "a rocket", **arguments)
        with pytest.raises(ConfigurationError, match="text must be text, not list"):
            catalog.search("limits", ["a rocket"])
        cheap = {r["id"] for r in rows if r["price"] <= 12}
        assert {h.product_id for h in catalog.search("limits", "a", max_price="€ 12")} == cheap
        every = catalog.search("limits", "a", max_price=float("inf"), top_k=50)
        assert len(every) == len(rows)
        prices = {h.product_id: (h.price, h.currency) for h in every}
        assert prices["pin"] == (4.49, None) and prices["gift"] == (25.0, None)


def test_a_text_the_text_model_cannot_embed_fails_its_product_not_the_run(data_dir, photos):
    server = EmbeddingServer(dimension=16)
    settings = {**TINY, "text_model": "openai:test-embed", "openai_api_key": "sk-test",
                "text_api_base": f"{server.url}/v1"}  # fmt: skip
    products = _products(photos)
    products[1]["title"] = "ZERO-VECTOR print"
    try:
        with Catalog(**settings) as catalog:
            catalog.upsert_products("odd", products)
            stats = catalog.embed("odd")
            assert (stats.successful, stats.failed) == (len(products) - 1, 1)
            failure = stats.failures[0]
            assert (failure["product_id"], failure["error_type"]) == ("p1", "TextEmbeddingError")
            assert "non-finite or zero vector for this text" in failure["error"]
            assert catalog.product("odd", "p1")["status"] == "failed"
    finally:
        server.close()


def test_combined_vectors_over_2000_dimensions_are_indexed_in_half_precision(data_dir, photos):
    """EfficientNet-Lite0 1280 + a 1536-d OpenAI-compatible model = 2816 dimensions: more than
    pgvector indexes as `vector`; every index is on halfvec, scores in full precision."""
    server = EmbeddingServer(dimension=1536)
    settings = {
        "model": "efficientnet-lite0",
        "text_model": "openai:text-embedding-3-small",
        "text_api_base": f"{server.url}/v1",
        "openai_api_key": "sk-test",
    }
    try:
        with Catalog(**settings) as catalog:
            catalog.upsert_products("wide", _products(photos))
            assert catalog.embed("wide").successful == len(photos) + 2
            with psycopg.connect(catalog.repository.url) as connection:
                indexes = dict(
                    connection.execute(
                        "SELECT indexname, indexdef FROM pg_indexes WHERE indexdef LIKE %s",
                        ("%store_id = 'wide'%",),
                    ).fetchall()
                )
            kinds = sorted(d.split("::")[1].split(")")[0] for d in indexes.values())
            assert kinds == ["halfvec(1280", "halfvec(1536", "halfvec(2816"]
            stored = _vectors(catalog, "wide")
            hits = catalog.search("wide", "coffee print", image=photos[2], top_k=len(stored))
            assert hits[0].product_id == "p2"
            _check_scores(
                hits,
                stored,
                catalog.service.embed_image(photos[2]),
                catalog.text_embedder.embed(["coffee print"])[0],
            )
            text_only = catalog.search("wide", "coffee print", top_k=2)  # no text tower
            assert text_only[0].ranked_by == "text" and text_only[0].image_score is None
            q_text = catalog.text_embedder.embed(["coffee print"])[0]
            for hit in text_only:  # the score is the text cosine
                cosine = float(_unit(stored[hit.product_id][0]) @ _unit(q_text))
                assert hit.score == pytest.approx(cosine, abs=1e-5)
                assert hit.text_score == pytest.approx(cosine, abs=1e-5)
    finally:
        server.close()


def test_incremental_runs_failures_weights_and_provenance(data_dir, photos, tmp_path):
    products = _products(photos[:4])
    products.append({"id": "broken", "title": "Broken", "image_url": str(tmp_path / "nope.jpg")})
    with Catalog(**TINY) as catalog:
        catalog.upsert_products("s", products)
        first = catalog.embed("s")
        assert (first.total, first.processed, first.successful, first.failed) == (7, 7, 6, 1)
        assert first.failures == [
            {
                "product_id": "broken",
                "error_type": "ImageNotFoundError",
                "error": f"{tmp_path / 'nope.jpg'}: no such file",
            }
        ]
        failed = catalog.product("s", "broken")
        assert failed["status"] == "failed" and failed["error_type"] == "ImageNotFoundError"
        before = _vectors(catalog, "s")

        again = catalog.embed("s")  # only the failed product, retried
        assert (again.processed, again.failed, again.skipped) == (1, 1, 6)
        assert catalog.product("s", "broken")["attempts"] == 2

        products[0]["title"] = "A new title"  # text changed
        products[1]["category"] = "sieraden"  # category (in the text) and weights changed
        products[2]["image_url"] = str(photos[5])  # image changed
        products[-1]["image_url"] = str(photos[4])  # fixed
        report = catalog.upsert_products("s", products)
        assert (report.inserted, report.updated, report.unchanged) == (0, 4, 3)
        third = catalog.embed("s")
        assert (third.processed, third.successful, third.failed, third.skipped) == (4, 4, 0, 3)
        after = _vectors(catalog, "s")
        assert not np.array_equal(after["p0"][0], before["p0"][0])  # new text vector
        np.testing.assert_array_equal(after["p0"][1], before["p0"][1])  # same image vector
        assert not np.array_equal(after["p1"][0], before["p1"][0])
        np.testing.assert_array_equal(after["p1"][1], before["p1"][1])
        assert after["p1"][3:] == (0.55, 0.45) and before["p1"][3:] == (0.75, 0.25)
        assert not np.array_equal(after["p2"][1], before["p2"][1])  # new image vector
        np.testing.assert_array_equal(after["p2"][0], before["p2"][0])
        assert catalog.product("s", "broken")["status"] == "embedded"

        assert catalog.embed("s", mode="missing").processed == 0
        forced = catalog.embed("s", mode="force")
        assert (forced.processed, forced.skipped) == (7, 0)
        stats = catalog.stats("s")
        assert (stats.total, stats.embedded, stats.failed, stats.to_embed) == (7, 7, 0, 0)
        assert stats.text_only == 2 and stats.provenance["text_model"] == "minilm"

    weights = tmp_path / "weights.toml"
    weights.write_text("[categories.fashion]\nimage = 0.5\ntext = 0.5\n")
    with Catalog(**TINY, category_weights=weights) as catalog:
        assert catalog.stats("s").to_embed == 2  # the two fashion products
        before = _vectors(catalog, "s")
        reweighed = catalog.embed("s")  # re-fused from the stored vectors: no model runs
        assert (reweighed.processed, reweighed.skipped) == (2, 5)
        after = _vectors(catalog, "s")
        text, image, combined, *book_weights = after["p0"]
        assert book_weights == [0.5, 0.5] and before["p0"][3:] == (0.75, 0.25)
        np.testing.assert_array_equal(text, before["p0"][0])
        np.testing.assert_array_equal(image, before["p0"][1])
        np.testing.assert_allclose(
            combined, np.concatenate([0.5 * _unit(image), 0.5 * _unit(text)]), atol=1e-6
        )
        assert catalog.stats("s").weights_version == load_weights(weights).version

    with Catalog(model="imgembed-tiny", pretrained="seed:1") as other:
        with pytest.raises(ProvenanceMismatchError, match="IMGEMBED_PRETRAINED=seed:0"):
            other.embed("s")
        with pytest.raises(ProvenanceMismatchError, match="--force"):
            other.search("s", "cat")
    same = Catalog.for_store("s")
    assert same.service.model_ref.pretrained == "seed:0"  # the store's models by default
    same.close()
    with Catalog(model="imgembed-tiny", pretrained="seed:1") as other:
        # another model: the store starts over; stopped after one batch, the products not
        # yet done count as not embedded, not under their old categories
        stop = _IndexWatch(other.repository.url, "s", stop_after=1)
        with pytest.raises(KeyboardInterrupt):
            other.embed("s", mode="force", batch_size=3, events=stop)
        halfway = other.stats("s")
        assert (halfway.embedded, halfway.categories["(not embedded)"]) == (3, 4), halfway
        assert sum(halfway.categories.values()) == 7
        reset = other.embed("s", mode="force")
        assert reset.successful == 7
        assert other.search("s", "cat", top_k=1)[0].score is not None
        assert other.stats("s").provenance["image_pretrained"] == "seed:1"
        with pytest.raises(CollectionNotFoundError, match="no products"):
            other.embed("empty")


class _IndexWatch(NoEvents):
    """Records after each batch whether the store's HNSW indexes exist; can stop the run."""

    def __init__(self, url, store_id, stop_after=None):
        self.url, self.store_id, self.stop_after = url, store_id, stop_after
        self.seen: list[int] = []

    def batch_done(self, stats):
        self.seen.append(_indexes(self.url, self.store_id))
        if self.stop_after is not None and len(self.seen) >= self.stop_after:
            raise KeyboardInterrupt("stopped by the test")


def _indexes(url, store_id) -> int:
    names = [index_name(store_id, part) for part in PARTS]
    with psycopg.connect(url) as connection:
        statement = "SELECT count(to_regclass(n)) FROM unnest(%s::text[]) n"
        return connection.execute(statement, (names,)).fetchone()[0]


def test_a_bulk_run_builds_the_indexes_afterwards_and_a_stopped_one_leaves_them_to_the_next(
    data_dir, photos
):
    products = _products(photos)[:8]
    query = "a cup of coffee"
    with Catalog(**TINY, defer_index_min=5) as catalog:
        url = catalog.repository.url
        catalog.upsert_products("bulk", products)
        stopped = _IndexWatch(url, "bulk", stop_after=2)
        with pytest.raises(KeyboardInterrupt):
            catalog.embed("bulk", batch_size=3, events=stopped)
        assert stopped.seen == [0, 0]  # 8 new products: set aside for the bulk load
        assert catalog.stats("bulk").indexes_missing == ["combined", "image", "text"]
        shown = run("catalog", "stats", "--store-id", "bulk").stdout
        assert "search indexes missing" in shown and "combined, image, text" in shown
        stored = {k: v for k, v in _vectors(catalog, "bulk").items() if v[2] is not None}
        assert len(stored) == 6
        q_image = catalog.service.embed_text(query)
        q_text = catalog.text_embedder.embed([query])[0]
        _check_scores(catalog.search("bulk", query, top_k=6), stored, q_image, q_text)  # exact

        resumed = _IndexWatch(url, "bulk")  # 2 to go: too few for a bulk load
        assert catalog.embed("bulk", batch_size=3, events=resumed).successful == 2
        assert resumed.seen == [0] and _indexes(url, "bulk") == 3  # built by this run's end
        assert catalog.stats("bulk").indexes_missing == []
        everything = _vectors(catalog, "bulk")
        _check_scores(catalog.search("bulk", query, top_k=8), everything, q_image, q_text)

    for product in products[:3]:
        product["title"] += " (new)"
    with Catalog(**TINY, defer_index_min=2) as catalog:
        catalog.upsert_products("bulk", products)
        kept = _IndexWatch(url, "bulk")  # 3 changed of 8 embedded: kept up to date instead
        assert catalog.embed("bulk", batch_size=3, events=kept).successful == 3
        assert kept.seen == [3]

    with Catalog(**TINY, defer_index_min=0) as catalog:  # 0: never set aside
        never = _IndexWatch(url, "bulk")
        assert catalog.embed("bulk", batch_size=5, mode="force", events=never).successful == 8
        assert never.seen == [3, 3]


def test_an_index_build_holds_no_product_search(data_dir, photos, monkeypatch):
    """Builds run on a connection of their own: while one waits (on a large store it takes
    minutes), the catalogue a server shares answers searches of that store (exact) and of
    others."""
    products = _products(photos)[:8]
    with Catalog(**TINY, defer_index_min=5) as catalog:
        for store_id in ("built", "other"):
            catalog.upsert_products(store_id, products)
            catalog.embed(store_id, batch_size=8)
        repository = catalog.repository
        assert repository.bulk_load("built", 8, 5) and _indexes(repository.url, "built") == 0
        with index_builds_held(repository.url, "imgembed_products") as build_waits:
            building = threading.Thread(
                target=repository.refresh, args=("built", catalog.provenance()), daemon=True
            )
            building.start()
            build_waits()
            for store_id in ("other", "built"):
                found = answered_within(lambda s=store_id: catalog.search(s, "coffee", top_k=3))
                assert found and len(found[0]) == 3, store_id
            assert building.is_alive()  # the build still waits
        building.join(60)
        assert not building.is_alive() and _indexes(repository.url, "built") == 3

        # one build or drop at a time on the shared table, in every process (two CONCURRENTLY
        # statements wait for each other: a deadlock); a build waits for the one before
        assert repository.bulk_load("built", 8, 5) and _indexes(repository.url, "built") == 0
        with psycopg.connect(repository.url, autocommit=True) as other:
            held = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
            assert other.execute(held, (INDEX_DDL,)).fetchone()[0]
            with monkeypatch.context() as short:  # not for ever: a job waiting here can stop
                short.setattr(pgconn, "LOCK_WAIT_SECONDS", 0.5)
                with pytest.raises(StoreBusyError, match=r"for over 0.5 s .* run it again later"):
                    repository.refresh("built", catalog.provenance())
            building = threading.Thread(
                target=repository.refresh, args=("built", catalog.provenance()), daemon=True
            )
            building.start()
            building.join(2.0)
            assert building.is_alive() and _indexes(repository.url, "built") == 0
        building.join(60)  # the other session's lock went with its connection
        assert not building.is_alive() and _indexes(repository.url, "built") == 3


class _Stopped(Exception):
    pass


class _StopWhenWaiting(NoEvents):
    """Stops the run where it waits on the database for `what` (a job cancelled there)."""

    def __init__(self, what: str):
        self.what = what

    def waiting(self, what):
        if what.startswith(self.what):
            raise _Stopped(what)


def test_a_run_waiting_on_the_store_indexes_stops_when_its_job_does(data_dir, photos):
    """A run waiting for another session's turn at the stores' indexes (up to 5 minutes), or
    for its own build (minutes on a large store), stops within a second when its job is
    stopped. The next run builds what was left; nothing is lost."""
    products = _products(photos)[:8]
    with Catalog(**TINY, defer_index_min=5) as catalog:
        url = catalog.repository.url
        catalog.upsert_products("waits", products)
        with psycopg.connect(url, autocommit=True) as other:
            held = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
            assert other.execute(held, (INDEX_DDL,)).fetchone()[0]
            turn = _StopWhenWaiting("setting the store's indexes aside")
            stopped = answered_within(lambda: raised(catalog.embed, "waits", events=turn))
            assert stopped and isinstance(stopped[0], _Stopped), stopped
            assert f"waiting while another session holds {INDEX_DDL!r}" in str(stopped[0])
        assert catalog.stats("waits").embedded == 0

        with contextlib.ExitStack() as later:
            build = _StopWhenWaiting("building the store's indexes")
            build.batch_done = lambda stats: (  # from the last batch on, the build waits
                stats.processed == stats.to_process
                and later.enter_context(index_builds_held(url, "imgembed_products"))
            )
            stopped = answered_within(lambda: raised(catalog.embed, "waits", events=build))
            assert stopped and isinstance(stopped[0], _Stopped), stopped
        stats = catalog.stats("waits")
        assert stats.embedded == 8 and stats.indexes_missing == ["combined", "image", "text"]
        assert catalog.embed("waits").to_process == 0 and _indexes(url, "waits") == 3

        # a forced run stopped there has marked its products: the resume without it redoes them
        with psycopg.connect(url, autocommit=True) as other:
            assert other.execute(held, (INDEX_DDL,)).fetchone()[0]
            stopped = answered_within(
                lambda: raised(catalog.embed, "waits", mode="force", events=turn)
            )
            assert stopped and isinstance(stopped[0], _Stopped), stopped
        assert catalog.embed("waits").successful == 8


def test_seed_functions_lengths_and_fusion(data_dir, photos, monkeypatch):
    import imgembed.catalog as catalog_module

    monkeypatch.setenv("IMGEMBED_MODEL", "imgembed-tiny")
    monkeypatch.setenv("IMGEMBED_PRETRAINED", "seed:0")
    catalog_module.default_catalog.cache_clear()
    try:
        image = catalog_module.generate_image_embedding(str(photos[0]))
        assert len(image) == 64 and np.linalg.norm(image) == pytest.approx(1, abs=1e-5)
        combined = catalog_module.generate_embedding(
            title="Rode T-shirt",
            description="Comfortabele katoenen t-shirt",
            category="fashion",
            price=29.99,
            image_url=str(photos[0]),
        )
        assert len(combined) == 64 + 384
        text = catalog_module.generate_text_embedding(
            "Rode T-shirt\nComfortabele katoenen t-shirt\nCategory: fashion\nPrice: 29.99"
        )
        assert len(text) == 384 and np.linalg.norm(text) == pytest.approx(1, abs=1e-5)
        with pytest.raises(ConfigurationError, match="must be a str, not list"):
            catalog_module.generate_text_embedding(["Rode T-shirt"])
        manual = catalog_module.combine_embeddings(
            text_emb=text, image_emb=image, category="kleding"
        )
        np.testing.assert_allclose(combined, manual, atol=1e-6)
        np.testing.assert_allclose(manual[:64], 0.75 * np.asarray(image), atol=1e-6)
        text_only = catalog_module.combine_embeddings(text_emb=text, image_emb=None)
        assert not any(text_only[:64]) and len(text_only) == 448
        # an image vector given as the text part would shift every score: refused
        with pytest.raises(ConfigurationError, match="text embedding has 64 dimensions, exp"):
            catalog_module.combine_embeddings(text_emb=image, image_emb=image)
        # OpenAI's 1536-d vectors with MiniLM configured: the message names the setting
        with pytest.raises(ConfigurationError, match=r"expected 384: .*minilm.*TEXT_MODEL"):
            catalog_module.combine_embeddings(text_emb=np.ones(1536), image_emb=image)
        with pytest.raises(ConfigurationError, match=r"image embedding .* \(IMGEMBED_MODEL\)"):
            catalog_module.combine_embeddings(text_emb=text, image_emb=np.ones(512))
        with pytest.raises(ConfigurationError, match="price 'abc' is not a number"):
            catalog_module.generate_embedding(title="x", price="abc")
        with pytest.raises(ConfigurationError, match="price -3 must be 0 or more"):
            catalog_module.generate_embedding(title="x", price=-3)
        with pytest.raises(ConfigurationError, match="title must be text, not NoneType"):
            catalog_module.generate_embedding(title=None)
        with pytest.raises(ConfigurationError, match="category must be text, not int"):
            catalog_module.generate_embedding(title="x", category=123)
        priced = catalog_module.generate_embedding(title="Rode T-shirt", price="€ 29,99")
        assert priced == catalog_module.generate_embedding(title="Rode T-shirt", price=29.99)
    finally:
        catalog_module.default_catalog().close()
        catalog_module.default_catalog.cache_clear()


def test_alembic_upgrade_head_from_the_repository(data_dir):
    alembic = str(Path(sys.executable).with_name("alembic"))
    proc = subprocess.run(
        [alembic, "upgrade", "head"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Running upgrade 0001 -> 0002" in proc.stderr
    assert "Running upgrade 0003 -> 0004" in proc.stderr
    assert revisions(embedded.start(data_dir)) == ("0004", "0004")


def _index_kinds(url, store_id) -> list[str]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexdef LIKE %s",
            (f"%store_id = '{store_id}'%",),
        ).fetchall()
    return sorted(row[0].split("::")[1].split(")")[0] for row in rows)


def test_migration_0004_rebuilds_the_indexes_in_half_precision_and_back(data_dir, photos):
    from alembic import command

    from imgembed.store.postgres import _alembic_config

    with Catalog(**TINY) as catalog:  # tiny CLIP 64 + MiniLM 384 = 448
        url = catalog.repository.url
        catalog.upsert_products("old", _products(photos))
        catalog.embed("old")
        stored = _vectors(catalog, "old")
        q_image = catalog.service.embed_text("coffee")
        q_text = catalog.text_embedder.embed(["coffee"])[0]
        assert _index_kinds(url, "old") == ["halfvec(384", "halfvec(448", "halfvec(64"]

        command.downgrade(_alembic_config(url), "0003")  # the indexes of the last release
        assert revisions(url)[0] == "0003"
        assert _index_kinds(url, "old") == ["vector(384", "vector(448", "vector(64"]
        command.upgrade(_alembic_config(url), "head")
        assert _index_kinds(url, "old") == ["halfvec(384", "halfvec(448", "halfvec(64"]
        hits = catalog.search("old", "coffee", top_k=len(stored))
        _check_scores(hits, stored, q_image, q_text)


def test_openai_embedder_in_a_catalogue_keeps_its_dimension(data_dir, photos):
    server = EmbeddingServer(dimension=32)
    try:
        with Catalog(**TINY, text_model="openai:m", text_api_base=f"{server.url}/v1") as catalog:
            assert isinstance(catalog.text_embedder, OpenAIEmbedder)
            catalog.upsert_products("o", _products(photos[:2]))
            assert catalog.embed("o").successful == 4
            assert catalog.provenance().text_dimension == 32
        server.dimension = 8  # the endpoint now serves another model
        with (
            Catalog(**TINY, text_model="openai:m", text_api_base=f"{server.url}/v1") as catalog,
            pytest.raises(ProvenanceMismatchError, match="openai:m"),
        ):
            catalog.search("o", "x")
    finally:
        server.close()
    # The text API gone (nor a key for api.openai.com): a photo alone still finds products,
    # by the image part only; a text is a typed error.
    for base in (f"{server.url}/v1", None):
        gone = {**TINY, "text_model": "openai:m", "text_api_base": base, "text_retries": 0}
        with Catalog(**gone) as catalog:
            hits = catalog.search("o", image=photos[1], top_k=2)
            assert (hits[0].product_id, hits[0].ranked_by) == ("p1", "image")
            with pytest.raises((TextEmbeddingError, ConfigurationError)):
                catalog.search("o", "x", image=photos[1])


def test_objects_for_an_http_layer_and_embedding_some_products(data_dir, photos):
    """What an HTTP endpoint calls: upsert objects (flat or Shopify), embed just those, read
    one back (no vectors)."""
    shopify = {
        "id": 42,
        "title": "Shirt",
        "body_html": "<p>Blue <b>cotton</b></p>",
        "product_type": "Kleding",
        "variants": [{"price": "20"}, {"price": "18.5"}],
        "images": [{"src": str(photos[1]), "position": 1}],
    }
    with Catalog(**TINY) as catalog:
        report = catalog.upsert_products(
            "api",
            [
                {"id": "a", "title": "Lamp", "image_url": str(photos[2])},
                {"title": "no id"},
                shopify,
                {"id": "b", "title": "Vase", "price": "many"},
            ],
        )
        assert (report.rows, report.inserted) == (4, 2)
        assert [(b.line, b.message) for b in report.bad_rows] == [
            (2, "no product id (a column product_id, id, sku, handle or artikelnummer)"),
            (4, "product b: price 'many' is not a number"),
        ]
        stats = catalog.embed("api", product_ids=["42"])
        assert (stats.total, stats.successful) == (1, 1)
        shirt = catalog.product("api", "42")
        assert shirt["status"] == "embedded" and shirt["weight_category"] == "fashion"
        assert shirt["description"] == "Blue cotton" and shirt["price"] == 18.5
        assert shirt["image_model"].startswith("imgembed-tiny (seed:0) preprocess ")
        assert catalog.product("api", "a")["status"] == "pending"
        assert catalog.product("api", "nope") is None
        assert catalog.stats("api").to_embed == 1


def test_a_connection_lost_while_storing_products_is_made_again_and_the_chunk_stored(
    data_dir, caplog, monkeypatch
):
    """An import whose connection is lost during a chunk's upsert (the embedded server
    killed, an administrator) stores it once more after reconnecting, as every other call
    does: it ended the import with exit 6 and no word of how to go on."""
    url = embedded.start(data_dir)
    repository = ProductRepository(url, reopen=lambda: embedded.start(data_dir))
    products = [importer.product({"id": f"i{n}", "title": f"Item {n}"}) for n in range(3)]
    real, dropped = psycopg.Cursor.executemany, []

    def lost_once(cursor, *args, **kwargs):
        if not dropped:
            dropped.append(_drop_imgembed_connections(url))  # this very session, too
        return real(cursor, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "executemany", lost_once)
    with caplog.at_level(logging.WARNING, "imgembed.store.pgconn"):
        assert repository.upsert_products("lost", products) == (3, 0, 0)
    assert dropped and dropped[0] >= 1
    assert "reconnecting and trying once more" in caplog.text
    assert repository.product("lost", "i2")["title"] == "Item 2"
    repository.close()


def test_a_commit_whose_answer_was_lost_is_not_repeated_and_keeps_its_counts(
    data_dir, tmp_path, caplog
):
    """The connection lost after the server committed, before its answer came: the repeat
    found the rows as the lost commit had left them. An import counted them all unchanged
    (new products: "0 new, 4 unchanged"), a batch of embeddings counted its attempts twice.
    Now the commit's outcome is asked for (pg_xact_status): committed, its result stands and
    nothing is repeated; not committed (the COMMIT itself lost), it is repeated as before."""
    url = embedded.start(data_dir)
    proxy = CutAtCommit(url, tmp_path)
    repository = ProductRepository(proxy.url, reopen=lambda: proxy.url)
    try:
        first = [importer.product({"id": i, "title": i.upper()}) for i in ("a", "b")]
        repository.upsert_products("lost", first)
        titles = [("a", "A again"), ("b", "B"), ("c", "C"), ("d", "D")]
        products = [importer.product({"id": i, "title": t}) for i, t in titles]
        proxy.armed.set()
        with caplog.at_level(logging.WARNING, "imgembed.store.pgconn"):
            counts = repository.upsert_products("lost", products)
        assert proxy.cut == 1  # the fault happened: committed, and the answer lost
        assert counts == (2, 1, 1)  # c and d new, a updated, b unchanged (was (0, 0, 4))
        assert "storing products was committed before the connection was lost" in caplog.text
        assert repository.product("lost", "a")["title"] == "A again"
        assert repository.count("lost") == 4

        provenance = StoreProvenance("m", "p", "x", 8, "t", 8)
        failed = [FailedProduct("c", "no image", "ImageNotFoundError")]
        proxy.armed.set()
        repository.save_batch("lost", provenance, "w1", [], failed)
        assert proxy.cut == 2
        assert repository.product("lost", "c")["attempts"] == 1  # was 2

        proxy.forward = False  # the COMMIT itself lost: nothing written, the repeat counts it
        proxy.armed.set()
        more = [importer.product({"id": "e", "title": "E"}), products[0]]
        assert repository.upsert_products("lost", more) == (1, 0, 1)
        assert proxy.cut == 3
        assert repository.count("lost") == 5
    finally:
        repository.close()
        proxy.close()


def test_a_commit_lost_while_its_session_still_holds_it_is_not_repeated_behind_it(
    data_dir, tmp_path
):
    """The connection lost at a COMMIT the server had not yet done (on its way, or never
    come: the server still waits for its client in the transaction): pg_xact_status said
    "in progress", read as not committed, and the work was repeated. The repeat waited for
    the lost session's row locks (for hours, until the server noticed its client gone); when
    the late COMMIT came, it found its own writes: "0 new, 0 updated, 4 unchanged". Now that
    session is ended first and its outcome asked for."""
    url = embedded.start(data_dir)
    proxy = CutAtCommit(url, tmp_path)
    repository = ProductRepository(proxy.url, reopen=lambda: proxy.url)
    held = threading.Event()

    def release_the_commit() -> None:  # once the repeat waits behind it, or it has ended
        with psycopg.connect(url, autocommit=True) as admin:
            while not held.wait(0.05):
                sessions = admin.execute(
                    "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'),"
                    " count(*) FILTER (WHERE state LIKE 'idle in transaction%%')"
                    " FROM pg_stat_activity WHERE application_name = %s",
                    (pgconn.APPLICATION,),
                ).fetchone()
                if proxy.cut and (sessions[0] or not sessions[1]):
                    break
        proxy.release.set()

    try:
        first = [importer.product({"id": i, "title": i.upper()}) for i in ("a", "b")]
        repository.upsert_products("lost", first)
        titles = [("a", "A again"), ("b", "B"), ("c", "C"), ("d", "D")]
        products = [importer.product({"id": i, "title": t}) for i, t in titles]
        proxy.forward = "hold"
        proxy.armed.set()
        releaser = threading.Thread(target=release_the_commit, daemon=True)
        releaser.start()
        counts = repository.upsert_products("lost", products)
        assert proxy.cut == 1  # the fault happened: the COMMIT held, the client's end closed
        assert counts == (2, 1, 1)  # c and d new, a updated, b unchanged (was (0, 0, 4))
        assert repository.product("lost", "a")["title"] == "A again"
        assert repository.count("lost") == 4
    finally:
        held.set()
        proxy.release.set()
        repository.close()
        proxy.close()


def test_dropped_connections_are_made_again_and_a_dead_server_is_a_typed_error(
    data_dir, photos, caplog, monkeypatch
):
    """The catalogue's SQL goes through the stores' connection: a batch whose connection was
    dropped is retried once; a read after a stopped embedded server starts it again; a server
    gone for good is a StoreUnavailableError; nothing is embedded twice."""
    url = embedded.start(data_dir)

    class DropOnce(NoEvents):
        def __init__(self):
            self.dropped = []

        def batch(self, number, stats, size):
            if number == 2 and not self.dropped:
                self.dropped.append(_drop_imgembed_connections(url))

    with Catalog(**TINY) as catalog, caplog.at_level(logging.WARNING, "imgembed.store.pgconn"):
        catalog.upsert_products("faults", _products(photos))
        events = DropOnce()
        stats = catalog.embed("faults", batch_size=3, events=events)
        assert events.dropped and events.dropped[0] >= 1
        assert (stats.successful, stats.failed) == (len(photos) + 2, 0)
        assert any("went away" in r.getMessage() for r in caplog.records)
        embedded.stop(data_dir)
        assert catalog.stats("faults").embedded == len(photos) + 2  # started again
        with psycopg.connect(catalog.repository.url) as connection:
            attempts = connection.execute(
                "SELECT min(attempts), max(attempts) FROM imgembed_products"
            ).fetchone()
        assert attempts == (1, 1)  # the retried batch was stored once

    monkeypatch.setattr(pgconn, "RECONNECT_SECONDS", 1.0)
    nowhere = f"postgresql://postgres@/postgres?host={data_dir / 'no-such-socket-dir'}"
    repository = ProductRepository(url, reopen=lambda: nowhere)  # the server never comes back
    _drop_imgembed_connections(url)
    with pytest.raises(StoreUnavailableError, match=r"went away (during|before) reading a product"):
        repository.product("faults", "p0")
    repository.close()
