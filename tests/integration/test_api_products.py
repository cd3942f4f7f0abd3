"""The product catalogue over HTTP (in process): upsert flat and Shopify products, the embed
job, search by text, by an uploaded photo and by both with per-part scores that add up to the
fused score, filters, statistics, thumbnails, and the errors of each route."""

import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from imgembed.api import create_app
from imgembed.catalog import findly_table
from imgembed.config import load_settings
from tests.conftest import TINY
from tests.integration.test_api import _wait_for_model

TABLE = findly_table()
CATEGORIES = ["fashion", "kleding", "tech", "interieur", "sieraden", None]


@pytest.fixture
def root(photos, tmp_path):
    folder = tmp_path / "root"
    folder.mkdir()
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    return folder


def _products(root, photos):
    rows = [
        {"id": f"p{n}", "title": f"{p.stem} poster", "description": f"A print of {p.stem}",
         "category": CATEGORIES[n % 6], "price": 10 + n, "image_url": str(root / p.name)}
        for n, p in enumerate(photos)
    ]  # fmt: skip
    shopify = {"id": 77, "title": "Gift card", "body_html": "<p>Any <b>amount</b></p>",
               "product_type": "Tech", "variants": [{"price": "25.00"}], "images": []}  # fmt: skip
    outside = {"id": "elsewhere", "title": "Outside", "image_url": str(photos[0])}
    return [*rows, {"title": "no id"}, shopify, outside]


def _finished(client, job):
    for _ in range(1200):
        state = client.get(job["url"]).json()
        if state["status"] not in ("queued", "running"):
            return state
        time.sleep(0.1)
    raise AssertionError(f"job did not finish: {state}")


def test_products_embed_search_and_stats_over_http(root, photos):
    settings = load_settings(**TINY, allowed_roots=[root])
    with TestClient(create_app(settings)) as client:
        _wait_for_model(client)
        answer = client.post("/api/v1/stores/shop/products", json={
            "products": _products(root, photos)})  # fmt: skip
        assert answer.status_code == 200, answer.text
        report = answer.json()["import"]
        count = len(photos) + 2
        assert (report["rows"], report["inserted"]) == (count + 1, count)
        assert [b["line"] for b in report["bad_rows"]] == [len(photos) + 1]
        job = _finished(client, answer.json()["job"])
        assert job["status"] == "done" and job["kind"] == "catalog-embed", job
        assert job["store_id"] == "shop" and job["progress"]["done"] == count
        stats = job["stats"]
        assert (stats["successful"], stats["failed"], stats["text_only"]) == (count - 1, 1, 1)
        assert stats["failures"][0]["product_id"] == "elsewhere"
        assert stats["failures"][0]["error_type"] == "SourceNotAllowedError"
        # the job's images in the server's metrics: the gift card has none
        assert job["progress"]["embedded"] == len(photos)
        metrics = client.get("/metrics").text
        assert f'imgembed_images_total{{outcome="embedded"}} {float(len(photos))}' in metrics

        assert client.get("/api/v1/stores").json() == [{"store_id": "shop", "products": count}]
        card = client.get("/api/v1/stores/shop/products/77").json()
        assert (card["status"], card["weight_category"], card["text_only"]) == (
            "embedded", "tech", True)  # fmt: skip
        assert card["price"] == 25 and card["currency"] is None  # a number, not "25.00"
        summary = client.get("/api/v1/stores/shop/stats").json()
        assert (summary["embedded"], summary["failed"], summary["to_embed"]) == (count - 1, 1, 1)

        # Text and image together: every score is the product's own category weights times
        # the two cosines.
        with open(root / "chelsea.png", "rb") as photo:
            both = client.post(
                "/api/v1/stores/shop/search",
                data={"query": "chelsea poster", "top_k": "20"},
                files={"file": ("q.png", photo, "image/png")},
            )
        assert both.status_code == 200, both.text
        results = both.json()["results"]
        assert both.json()["ranked_by"] == "combined" and len(results) == count - 1
        assert results[0]["product_id"] == "p1"  # chelsea's own photo and title
        for hit in results:
            weights = TABLE.weights(hit["category"])[1]
            assert (hit["image_weight"], hit["text_weight"]) == (weights.image, weights.text)
            image = hit["image_score"] or 0.0  # text-only products have a zero image part
            expected = weights.image * image + weights.text * hit["text_score"]
            assert hit["score"] == pytest.approx(expected, abs=1e-4)
        assert [h["rank"] for h in results] == list(range(1, count))
        not_an_image = client.post(
            "/api/v1/stores/shop/search", files={"file": ("notes.jpg", b"just some text")}
        )
        assert not_an_image.status_code == 400, not_an_image.text
        assert not_an_image.json()["error"].startswith("notes.jpg: "), not_an_image.text

        # An image alone ranks by the image cosine; the same photo is first at 1.0.
        alone = client.post("/api/v1/stores/shop/search",
                            json={"image_path": str(root / "rocket.jpg")}).json()  # fmt: skip
        assert alone["ranked_by"] == "image"
        assert (
            alone["results"][0]["product_id"] == f"p{[p.name for p in photos].index('rocket.jpg')}"
        )
        assert alone["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
        scores = [hit["score"] for hit in alone["results"]]
        assert scores == sorted(scores, reverse=True)

        cheap = client.post(
            "/api/v1/stores/shop/search", json={"query": "poster", "max_price": 11.5}
        ).json()
        assert {h["product_id"] for h in cheap["results"]} == {"p0", "p1"}
        fashion = client.post(
            "/api/v1/stores/shop/search", json={"query": "poster", "category": "kleding"}
        ).json()
        assert {h["weight_category"] for h in fashion["results"]} == {"fashion"}
        assert len(fashion["results"]) == 2  # "fashion" and its alias "kleding"

        def found(category):
            body = {"query": "poster", "category": category, "top_k": 20}
            return {h["product_id"] for h in client.post(
                "/api/v1/stores/shop/search", json=body).json()["results"]}  # fmt: skip

        # a name the table does not know is not the default category every such name
        # falls into; an empty field is no filter
        assert found("xyzzy") == set() and found("general")
        assert found("") == found(None) and len(found("")) == count - 1

        thumb = client.get("/api/v1/stores/shop/products/p1/thumbnail?size=64")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"

        def error(response):
            return response.status_code, response.json()["error_type"]

        assert error(client.post("/api/v1/stores/none/search", json={"query": "x"})) == (
            404, "CollectionNotFoundError")  # fmt: skip
        assert error(client.post("/api/v1/stores/shop/search", json={})) == (
            422, "ValidationError")  # fmt: skip
        outside = {"image_path": str(photos[0])}
        assert error(client.post("/api/v1/stores/shop/search", json=outside)) == (
            403, "SourceNotAllowedError")  # fmt: skip
        for unknown in ("/products/nope", "/products/nope/thumbnail"):  # the library's type
            assert error(client.get(f"/api/v1/stores/shop{unknown}")) == (
                404, "ProductNotFoundError")  # fmt: skip
        assert error(client.get("/api/v1/stores/shop/products/77/thumbnail")) == (
            404, "NotFoundError")  # fmt: skip
        assert error(client.get("/api/v1/stores/none/stats")) == (404, "CollectionNotFoundError")
        # a mistyped store is not a finished job of nothing: 404 before any job starts
        assert error(client.post("/api/v1/stores/none/embed", json={})) == (
            404, "CollectionNotFoundError")  # fmt: skip
        assert client.post("/api/v1/stores/shop/embed", json={"product_ids": []}).status_code == 422
        typo = client.post("/api/v1/stores/shop/embed", json={"product_ids": ["p1", "nope"]})
        assert error(typo) == (404, "ProductNotFoundError") and "'nope'" in typo.json()["error"]

        assert (
            client.post("/api/v1/stores/shop/products", json={"products": "x"}).status_code == 422
        )
        empty = client.post("/api/v1/stores/shop/products", json={"products": []})
        assert empty.status_code == 422  # nothing to do is not a success
        # an item that is not an object is that item's error, not the request's (was a 422
        # for all; `"attributes": "x"` was a 500)
        loose = client.post("/api/v1/stores/other/products", json={"embed": False, "products": [
            {"id": "ok", "title": "Kept"}, "p1", None, {"id": "x", "title": "t",
            "attributes": "color=red"}]})  # fmt: skip
        assert loose.status_code == 200, loose.text
        assert [(r["line"], r["message"]) for r in loose.json()["import"]["bad_rows"]] == [
            (2, "not a product object but 'p1'"), (3, "not a product object but None"),
            (4, 'product x: attributes must be an object, as {"color": "red"}')]  # fmt: skip
        assert loose.json()["import"]["product_ids"] == ["ok"]
        long_store = client.post(f"/api/v1/stores/{'s' * 501}/products", json={
            "products": [{"id": "a", "title": "t"}]})  # fmt: skip
        assert error(long_store) == (422, "ConfigurationError")
        retry = client.post("/api/v1/stores/shop/embed", json={})  # only the failed one is due
        assert retry.status_code == 202 and retry.json()["total"] == 1
        _finished(client, retry.json())

        # Nothing changed: a second upsert starts no job; a forced re-embed redoes all.
        again = client.post("/api/v1/stores/shop/products", json={
            "products": _products(root, photos)[:2]}).json()  # fmt: skip
        assert again["import"]["unchanged"] == 2 and again["job"] is None
        forced = client.post("/api/v1/stores/shop/embed", json={"mode": "force"})
        assert forced.status_code == 202
        redone = _finished(client, forced.json())["stats"]
        assert (redone["processed"], redone["successful"]) == (count, count - 1)

        # An id with "/" is stored and read back, its thumbnail too (the page encodes it).
        # The same id twice in one request is one product: the second is a bad row.
        slashed = {"id": "a/b", "title": "Slash", "image_url": str(root / "rocket.jpg")}
        added = client.post("/api/v1/stores/shop/products", json={
            "products": [slashed, {**slashed, "title": "again"}]}).json()  # fmt: skip
        assert (added["import"]["inserted"], added["import"]["product_ids"]) == (1, ["a/b"])
        (repeat,) = added["import"]["bad_rows"]
        assert repeat["message"].endswith("same id as line 1, which is kept")
        assert _finished(client, added["job"])["stats"]["successful"] == 1
        assert client.get("/api/v1/stores/shop/products/a%2Fb").json()["title"] == "Slash"
        slash_thumb = client.get("/api/v1/stores/shop/products/a%2Fb/thumbnail?size=32")
        assert slash_thumb.headers["content-type"] == "image/jpeg", slash_thumb.text


def test_a_lone_surrogate_is_a_bad_row_or_a_422_never_a_500(root):
    """JSON may escape half a surrogate pair ("\\ud800"), which no text model reads and no
    JSON answer can hold: a product holding one is its bad row, quoted as the escape; a
    search text holding one is refused."""

    def send(path, body):  # json.dumps escapes it, as a client's JSON would
        headers = {"Content-Type": "application/json"}
        return client.post(path, content=json.dumps(body), headers=headers)

    with TestClient(create_app(load_settings(**TINY, allowed_roots=[root]))) as client:
        _wait_for_model(client)
        products = [{"id": "\ud800", "title": "x"}, {"id": "ok", "title": "fine"}]
        upsert = send("/api/v1/stores/shop/products", {"products": products})
        assert upsert.status_code == 200, upsert.text
        (bad,) = upsert.json()["import"]["bad_rows"]
        assert bad == {"line": 1, "message": "product \\ud800: text that is not valid UTF-8"}
        assert _finished(client, upsert.json()["job"])["stats"]["successful"] == 1
        for query in ("\ud800", "red \udfff dress"):
            search = send("/api/v1/stores/shop/search", {"query": query})
            assert search.status_code == 422, search.text
            assert search.json()["error_type"] == "ConfigurationError"


def test_a_store_of_other_models_is_refused_before_a_job_starts(root, photos):
    """A server whose settings name other models than the store's answers 409 to an embed,
    and stores an upsert's products but says why they were not embedded."""
    products = _products(root, photos)[:2]
    with TestClient(create_app(load_settings(**TINY, allowed_roots=[root]))) as client:
        _wait_for_model(client)
        job = client.post("/api/v1/stores/own/products", json={"products": products}).json()
        assert _finished(client, job["job"])["status"] == "done"
    other = {**TINY, "pretrained": "seed:1"}
    with TestClient(create_app(load_settings(**other, allowed_roots=[root]))) as client:
        _wait_for_model(client)
        refused = client.post("/api/v1/stores/own/embed", json={})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error_type"] == "ProvenanceMismatchError"
        changed = [{**products[0], "title": "renamed"}]
        stored = client.post("/api/v1/stores/own/products", json={"products": changed}).json()
        assert stored["import"]["updated"] == 1 and stored["job"] is None
        assert stored["embed_error"]["error_type"] == "ProvenanceMismatchError"
    with TestClient(create_app(load_settings(**TINY, allowed_roots=[root]))) as client:
        _wait_for_model(client)
        # the same upsert again, on a server of the store's models: the refused product
        # is still to embed, though nothing in it changed
        again = client.post("/api/v1/stores/own/products", json={"products": changed}).json()
        assert again["import"]["unchanged"] == 1 and "embed_error" not in again, again
        assert _finished(client, again["job"])["stats"]["successful"] == 1
        done = client.post("/api/v1/stores/own/products", json={"products": changed}).json()
        assert done["job"] is None and "embed_error" not in done, done  # nothing left to do
    with TestClient(create_app(load_settings(**other, allowed_roots=[root]))) as client:
        _wait_for_model(client)
        forced = client.post("/api/v1/stores/own/embed", json={"mode": "force"})
        assert forced.status_code == 202 and forced.json()["total"] == 2
        assert _finished(client, forced.json())["stats"]["successful"] == 2


def test_a_store_another_process_embeds_is_refused_before_a_job_starts(root, photos, tmp_path):
    """While another process (a CLI run) holds a store, an embed answers 409 up front instead
    of a job that fails later; an upsert stores its products and says why they wait. While
    a job of this server's own holds it, the next request queues behind that job."""
    import threading

    import psycopg

    from imgembed.store import embedded

    products = _products(root, photos)[:2]
    with TestClient(create_app(load_settings(**TINY, allowed_roots=[root]))) as client:
        _wait_for_model(client)
        job = client.post("/api/v1/stores/busy/products", json={"products": products}).json()
        assert _finished(client, job["job"])["status"] == "done"
        changed = [{**products[0], "title": "renamed"}]
        with psycopg.connect(embedded.start(tmp_path / "data")) as holder:
            holder.execute("SELECT pg_advisory_lock(hashtextextended('imgembed-catalog:busy', 0))")
            refused = client.post("/api/v1/stores/busy/embed", json={"mode": "force"})
            assert refused.status_code == 409, refused.text
            assert refused.json()["error_type"] == "StoreBusyError"
            assert "another `catalog embed` is running" in refused.json()["error"]
            stored = client.post("/api/v1/stores/busy/products", json={"products": changed})
            assert stored.json()["import"]["updated"] == 1 and stored.json()["job"] is None
            assert stored.json()["embed_error"]["error_type"] == "StoreBusyError"
            # the same lock, held for a job of this server's (here: one that waits)
            release = threading.Event()
            own = client.app.state.imgembed.jobs.submit(
                "catalog-embed", "busy", 0, lambda progress: release.wait(60) and None
            )
            queued = client.post("/api/v1/stores/busy/embed", json={})
            assert queued.status_code == 202, queued.text
            assert client.get(queued.json()["url"]).json()["status"] == "queued"
            # at once: a closed connection's server process may let go a moment later
            holder.execute("SELECT pg_advisory_unlock_all()")
        release.set()  # the holder is gone, then the own job ends: the queued one runs
        assert client.get(f"/api/v1/jobs/{own.id}").json()["status"] in ("running", "done")
        done = _finished(client, queued.json())
        assert done["status"] == "done" and done["stats"]["successful"] == 1, done


def test_a_job_waiting_on_the_store_indexes_is_cancelled_at_once(root, photos, tmp_path):
    """DELETE of a catalogue job that waits for another session's index build (minutes on a
    large store) stops it within a second or so, not when that build ends; a rerun embeds."""
    import psycopg

    from imgembed.catalog.product_indexes import INDEX_DDL
    from imgembed.store import embedded

    products = _products(root, photos)[:4]
    settings = load_settings(**TINY, allowed_roots=[root], defer_index_min=2)  # a bulk load
    with TestClient(create_app(settings)) as client:
        _wait_for_model(client)
        with psycopg.connect(embedded.start(tmp_path / "data"), autocommit=True) as other:
            held = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
            assert other.execute(held, (INDEX_DDL,)).fetchone()[0]
            answer = client.post("/api/v1/stores/waits/products", json={"products": products})
            job = answer.json()["job"]
            deadline = time.monotonic() + 60
            while not (client.get(job["url"]).json()["progress"] or {}).get("waiting"):
                assert time.monotonic() < deadline, "the job does not say what it waits for"
                time.sleep(0.05)
            waiting = client.get(job["url"]).json()["progress"]["waiting"]
            assert "waiting while another session holds" in waiting, waiting
            client.delete(job["url"])
            deadline = time.monotonic() + 30  # the other session holds its turn for minutes
            while (state := client.get(job["url"]).json())["status"] == "running":
                assert time.monotonic() < deadline, "the job waits for the other session"
                time.sleep(0.1)
            assert state["status"] == "cancelled", state
            assert "cancelled by a request" in state["error"]["error"]
            assert state["progress"]["done"] == 0
        rerun = client.post("/api/v1/stores/waits/embed", json={}).json()
        done = _finished(client, rerun)
        assert done["status"] == "done" and done["stats"]["successful"] == 4, done
        assert client.get("/api/v1/stores/waits/stats").json()["indexes_missing"] == []


def test_a_broken_weights_file_is_the_servers_fault_not_the_requests(root, tmp_path):
    """The server starts with any IMGEMBED_CATEGORY_WEIGHTS; a file it cannot use answered
    every catalogue request 422, as if the request were at fault."""
    weights = tmp_path / "weights.toml"
    weights.write_text("[categories.fashion]\nimage = 0.9\ntext = 0.9\n")
    settings = load_settings(**TINY, allowed_roots=[root], category_weights=weights)
    with TestClient(create_app(settings)) as client:
        for answer in (
            client.get("/api/v1/stores"),
            client.post("/api/v1/stores/shop/search", json={"query": "a rocket"}),
        ):
            assert answer.status_code == 503, answer.text
            assert answer.json()["error_type"] == "CategoryWeightsError"
            assert f"{weights}: category 'fashion'" in answer.json()["error"]  # names the file


def test_a_server_without_allowed_roots_serves_an_embedded_store(root, photos):
    """No IMGEMBED_ALLOWED_ROOTS (the default: no local paths) and a store embedded before:
    its catalogue was made from the server's settings again, which refused their own "no
    roots" as a setting "set but naming no folder" (422 ConfigurationError on every search)."""
    products = _products(root, photos)[:2]
    with TestClient(create_app(load_settings(**TINY, allowed_roots=[root]))) as client:
        _wait_for_model(client)
        job = client.post("/api/v1/stores/own/products", json={"products": products}).json()
        assert _finished(client, job["job"])["stats"]["successful"] == 2
    with TestClient(create_app(load_settings(**TINY))) as client:
        _wait_for_model(client)
        found = client.post("/api/v1/stores/own/search", json={"query": "a poster"})
        assert found.status_code == 200 and len(found.json()["results"]) == 2, found.text
        # a local image is still no source for this server: the product fails, said why
        changed = [{**products[0], "image_url": str(root / photos[1].name)}]
        job = client.post("/api/v1/stores/own/products", json={"products": changed}).json()
        stats = _finished(client, job["job"])["stats"]
        assert stats["failures"][0]["error_type"] == "SourceNotAllowedError", stats
        assert "no local path is read here" in stats["failures"][0]["error"]  # not "roots ()"
