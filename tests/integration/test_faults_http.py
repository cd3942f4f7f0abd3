"""Hostile requests against a real server (uvicorn on loopback, the tiny seeded model, the
embedded PostgreSQL store or local Qdrant files): every refusal is a typed error with the
README's status, found before any work is queued, and the server stays healthy after.
A seeded, bounded set: deterministic and fast (found by helper-56's fault injection)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imgembed.api import create_app
from imgembed.config import load_settings
from tests.conftest import TINY
from tests.serving import serve_in_thread

STORES = ["postgres", "qdrant"]


@pytest.fixture
def root(photos, tmp_path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    shutil.copy(photos[0], folder / "photo.png")
    return folder


@contextlib.contextmanager
def _server(store: str, root: Path) -> Iterator[httpx.Client]:
    settings = load_settings(**TINY, store=store, allowed_roots=[root])
    with (
        serve_in_thread(create_app(settings)) as base,
        httpx.Client(base_url=base, timeout=60) as client,
    ):
        yield client
        assert client.get("/health").json() == {"status": "ok"}  # still healthy after


def _refused(answer: httpx.Response, status: int, kind: str) -> str:
    assert (answer.status_code, answer.json().get("error_type")) == (status, kind), answer.text
    return answer.json()["error"]


# names no collection can have ("." and ".." %-encoded, blank, control characters), and
# those Qdrant alone refuses
BAD_NAMES = {"postgres": ["%2E", "%2E%2E", "%20", "a%0Ab", "%09"]}
BAD_NAMES["qdrant"] = [*BAD_NAMES["postgres"], "%2A", "a%3Fb", "a%5Cb", "x" * 300]


@pytest.mark.parametrize("store", STORES)
def test_indexing_into_a_name_the_store_refuses_is_a_422_not_a_job_that_fails(store, root):
    """POST /collections/<name>/index answered 202 and queued a job that then failed with
    InvalidRecordError: the request was at fault, and nothing said so until the job was
    looked at. Now the name is refused at once (422), and no job is made."""
    from imgembed import ImageEmbeddingService
    from imgembed.errors import InvalidRecordError

    with _server(store, root) as client:
        for name in BAD_NAMES[store]:
            answer = client.post(
                f"/api/v1/collections/{name}/index", json={"sources": [str(root / "photo.png")]}
            )
            assert "collection name" in _refused(answer, 422, "InvalidRecordError"), name
        assert client.get("/api/v1/jobs").json() == {"jobs": []}
        fine = client.post("/api/v1/collections/ok/index", json={"sources": [str(root)]})
        assert fine.status_code == 202, fine.text
    with (
        ImageEmbeddingService(**TINY, store=store) as service,  # the library says the same
        pytest.raises(InvalidRecordError, match="collection name"),
    ):
        service.for_indexing("..")


@pytest.mark.parametrize("store", STORES)
def test_a_collection_that_never_was_is_not_said_to_have_been_dropped(store, root):
    """On Qdrant, a thumbnail (or any item read) of a collection that never existed said
    "it was dropped ...; what was stored in it is gone too": a loss that never happened.
    Now it is "no collection 'nope'", as on PostgreSQL and on every other route."""
    from imgembed import ImageEmbeddingService
    from imgembed.errors import CollectionNotFoundError

    with _server(store, root) as client:
        answers = [
            client.get("/api/v1/collections/nope/thumbnail", params={"id": "a"}),
            client.get("/api/v1/collections/nope/duplicates"),
            client.request("DELETE", "/api/v1/collections/nope/items", json={"ids": ["a"]}),
        ]
        for answer in answers:
            assert _refused(answer, 404, "CollectionNotFoundError") == "no collection 'nope'"
    with ImageEmbeddingService(**TINY, store=store) as service:
        for read in (service.store.get, service.store.delete):
            with pytest.raises(CollectionNotFoundError) as refused:
                read("nope", ["a"])
            assert str(refused.value) == "no collection 'nope'"


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>'
NOT_READ = {  # formats people send as images that imgembed does not read
    "logo.svg": SVG,
    "logo.jpg": b"\xef\xbb\xbf  <svg xmlns='http://www.w3.org/2000/svg'><rect/></svg>",
    "scan.pdf": b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n",
    "photo.jxl": b"\xff\x0a\xfa\x7f\x01\x90\x08\x06\x01\x00\x48" + bytes(64),
}


def test_an_svg_pdf_or_jpeg_xl_is_an_unsupported_format_not_a_corrupt_image(root, tmp_path):
    """An SVG logo, a PDF scan or a JPEG XL photo was "not a recognised image (unknown format
    or corrupt)", a 400 as for broken bytes; it is a known format imgembed does not read:
    415 UnsupportedFormatError naming it, from an upload, base64 and a path, in a batch, in
    the library and in the CLI (a failed input: exit 1)."""
    import base64
    import os
    import subprocess

    from imgembed import ImageEmbeddingService
    from imgembed.errors import UnsupportedFormatError
    from tests.serving import IMGEMBED, TINY_ENV

    for name, data in NOT_READ.items():
        (root / name).write_bytes(data)
    with _server("postgres", root) as client:
        for name, data in NOT_READ.items():
            kind = {".svg": "SVG", ".jpg": "SVG", ".pdf": "PDF", ".jxl": "JPEG XL"}[name[-4:]]
            answers = [
                client.post("/api/v1/embeddings/image", files={"file": (name, data)}),
                client.post(
                    "/api/v1/embeddings/image",
                    json={"image_base64": base64.b64encode(data).decode()},
                ),
                client.post("/api/v1/embeddings/image", json={"image_path": str(root / name)}),
            ]
            for answer in answers:
                assert kind in _refused(answer, 415, "UnsupportedFormatError"), name
            batch = client.post(
                "/api/v1/embeddings/image/batch",
                files=[
                    ("files", (name, data)),
                    ("files", ("photo.png", (root / "photo.png").read_bytes())),
                ],
            )
            results = batch.json()["results"]
            assert [r["error_type"] for r in results] == ["UnsupportedFormatError", None]
    with ImageEmbeddingService(**TINY) as service:
        for data in NOT_READ.values():
            with pytest.raises(UnsupportedFormatError):
                service.embed_image(data)
    cli = subprocess.run(
        [
            IMGEMBED,
            "embed",
            str(root / "logo.svg"),
            str(root / "photo.png"),
            "-o",
            str(tmp_path / "v.npy"),
        ],
        env={**os.environ, **TINY_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 1, cli.stderr
    assert "logo.svg: an SVG" in cli.stderr and "(UnsupportedFormatError)" in cli.stderr


def test_a_product_id_or_field_of_nan_or_infinity_is_a_bad_row(root, tmp_path):
    """JSON's NaN and Infinity (which Python's JSON reader takes) as a product's id became the
    products "nan" and "inf" (every such row the same product), and as a title the text
    "nan": now each is a bad row saying why, over HTTP and in `imgembed catalog import`."""
    from tests.cli import run

    rows = (
        '[{"id": NaN, "title": "a"}, {"id": Infinity, "title": "b"}, {"id": -Infinity, '
        '"title": "c"}, {"id": "p1", "title": NaN}, {"id": 7.5, "title": "ok"}]'
    )
    with _server("postgres", root) as client:
        answer = client.post(
            "/api/v1/stores/s/products",
            content=f'{{"embed": false, "products": {rows}}}',
            headers={"content-type": "application/json"},
        )
        assert answer.status_code == 200, answer.text
        report = answer.json()["import"]
        assert report["product_ids"] == ["7.5"]
        messages = [row["message"] for row in report["bad_rows"]]
        assert [row["line"] for row in report["bad_rows"]] == [1, 2, 3, 4]
        assert all("not a number" in message for message in messages), messages
        assert client.get("/api/v1/stores/s/products/nan").status_code == 404
    lines = tmp_path / "products.jsonl"
    lines.write_text('{"id": NaN, "title": "a"}\n{"id": "p2", "title": "b"}\n')
    imported = run("catalog", "import", str(lines), "--store-id=cli")
    assert imported.returncode == 1, imported.stderr
    assert f"{lines}:1: product id is nan (not a number)" in imported.stderr


def test_a_form_cut_short_is_said_to_be_cut_short_not_to_hold_no_image(root, photos):
    """A multipart body that ended before its closing boundary (a client or proxy that cut
    the upload) dropped the half-sent file without a word: 422 "give exactly one image", as
    if none had been sent. Now it is a 422 saying the form ended before "--XX--"; a whole
    form with the same part is read as before."""
    part = (
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + photos[0].read_bytes()
    )
    form = {"content-type": "multipart/form-data; boundary=XX"}
    with _server("postgres", root) as client:
        for route in ("/api/v1/embeddings/image", "/api/v1/search/image"):
            for cut in (part, part[:200], part + b"\r\n--XX", b""):
                answer = client.post(route, content=cut, headers=form)
                error = _refused(answer, 422, "ValidationError")
                assert "ended before its closing boundary (--XX--)" in error, (route, error)
        whole = client.post("/api/v1/embeddings/image", content=part + b"\r\n--XX--\r\n",
                            headers=form)  # fmt: skip
        assert whole.status_code == 200 and whole.json()["embedding"], whole.text


def test_json_nested_too_deeply_is_said_so_on_every_route(root):
    """/v1/embeddings (and every route FastAPI reads the JSON of) answered a body nested
    5000 deep with FastAPI's "There was an error parsing the body", where the routes that
    parse their own said "nested too deeply"; now all say it, /v1/ in OpenAI's shape."""
    deep = '{"input": ' + "[" * 5000 + "]" * 5000 + ', "model": "imgembed-tiny"}'
    as_json = {"content-type": "application/json"}
    with _server("postgres", root) as client:
        answer = client.post("/v1/embeddings", content=deep, headers=as_json)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["type"] == "ValidationError"
        assert answer.json()["error"]["message"] == "body: invalid JSON: nested too deeply"
        for route in ("/api/v1/embeddings/text", "/api/v1/collections",
                      "/api/v1/stores/s/products", "/api/v1/embeddings/image"):  # fmt: skip
            answer = client.post(route, content=deep, headers=as_json)
            assert _refused(answer, 422, "ValidationError") == (
                "body: invalid JSON: nested too deeply"
            ), route


def test_a_collection_or_store_named_with_an_encoded_slash_is_refused_not_redirected(root):
    """DELETE /api/v1/collections/%2F answered a bare 307 to /api/v1/collections, and "a%2F"
    a 307 to collection "a" (which a client following it would drop); "a%2Fitems" reached
    a's items. A name holding "/" is none a collection or store can have: the library's
    refusal, 422, on every method, before any route is taken."""
    with _server("postgres", root) as client:
        assert client.post("/api/v1/collections", json={"name": "a"}).status_code == 201
        for name in ("%2F", "a%2F", "a%2f", "a%2Fitems", "%2F%2F"):
            for method in ("GET", "DELETE", "POST"):
                answer = client.request(method, f"/api/v1/collections/{name}", json={})
                assert "collection name" in _refused(answer, 422, "InvalidRecordError"), name
            items = client.request(
                "DELETE", f"/api/v1/collections/{name}/items", json={"ids": ["x"]}
            )
            assert "collection name" in _refused(items, 422, "InvalidRecordError"), name
            stats = client.get(f"/api/v1/stores/{name}/stats")
            assert "store id" in _refused(stats, 422, "ConfigurationError"), name
        assert [c["name"] for c in client.get("/api/v1/collections").json()] == ["a"]
        product = client.get("/api/v1/stores/s/products/a%2Fb")  # ids may hold "/"
        assert _refused(product, 404, "ProductNotFoundError") == "no product 'a/b' in store 's'"


@pytest.mark.parametrize("store", STORES)
def test_a_nul_in_an_id_read_is_not_found_on_either_store(store, root):
    """A NUL character in an item id, product id or store id on a read was 422 "the database
    refused a value" on PostgreSQL, while Qdrant answered 404: nothing can be stored with a
    NUL (imports and indexing refuse it), so a read finds nothing, the same on both."""
    with _server(store, root) as client:
        indexed = client.post(
            "/api/v1/collections/c/index", json={"sources": [str(root / "photo.png")]}
        )
        assert indexed.status_code == 202, indexed.text
        job = client.get(indexed.json()["url"]).json()
        while job["status"] in ("queued", "running"):
            job = client.get(indexed.json()["url"]).json()
        assert job["status"] == "done", job
        products = {"products": [{"id": "p1", "title": "shirt"}], "embed": False}
        assert client.post("/api/v1/stores/s/products", json=products).status_code == 200
        item = client.get("/api/v1/collections/c/thumbnail", params={"id": "a\x00"})
        assert _refused(item, 404, "NotFoundError") == "no item 'a\\x00' in collection 'c'"
        query = client.post("/api/v1/search/image", json={"collection": "c", "query_id": "a\x00"})
        _refused(query, 404, "NotFoundError")
        gone = client.request("DELETE", "/api/v1/collections/c/items", json={"ids": ["a\x00"]})
        assert gone.json() == {"deleted": 0}, gone.text
        for path in ("/api/v1/stores/s/products/p1%00", "/api/v1/stores/s%00/products/p1",
                     "/api/v1/stores/s/products/p1%00/thumbnail"):  # fmt: skip
            _refused(client.get(path), 404, "ProductNotFoundError")
        _refused(client.get("/api/v1/stores/s%00/stats"), 404, "CollectionNotFoundError")
        for store_id, ids in (("s", ["p1\x00"]), ("s%00", ["p1"])):
            embed = client.post(f"/api/v1/stores/{store_id}/embed", json={"product_ids": ids})
            _refused(embed, 404, "ProductNotFoundError")
        search = client.post("/api/v1/stores/s%00/search", json={"query": "shirt"})
        _refused(search, 404, "CollectionNotFoundError")
        assert client.get("/api/v1/stores/s/products/p1").status_code == 200


def test_a_whole_number_id_in_a_float_form_is_that_number(root):
    """JSON ids -0 and -0.0 became two products, "0" and "-0.0", and 1 and 1.0 two, "1" and
    "1.0" (as 1e20 became "1e+20"): a whole number is one id however JSON writes it. Other
    numbers stay as written, and ids given as text are never changed."""
    from imgembed.catalog.products import checked

    rows = ('[{"id": -0, "title": "a"}, {"id": -0.0, "title": "b"}, {"id": 1, "title": "c"},'
            ' {"id": 1.0, "title": "d"}, {"id": 1e20, "title": "e"}, {"id": 7.5, "title": "f"},'
            ' {"id": "1.0", "title": "g"}]')  # fmt: skip
    with _server("postgres", root) as client:
        answer = client.post(
            "/api/v1/stores/s/products",
            content=f'{{"embed": false, "products": {rows}}}',
            headers={"content-type": "application/json"},
        )
        assert answer.status_code == 200, answer.text
        report = answer.json()["import"]
        assert report["product_ids"] == ["0", "1", "100000000000000000000", "7.5", "1.0"]
        assert [row["line"] for row in report["bad_rows"]] == [2, 4]  # the same id again
        assert client.get("/api/v1/stores/s/products/0").json()["title"] == "a"
    assert checked(product_id=-0.0, title="x").product_id == "0"  # the library's own rule
