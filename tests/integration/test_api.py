"""The HTTP API in process (FastAPI's TestClient): every endpoint, the seed's bodies and
fields, every error status from real bad inputs, and the security defaults."""

import asyncio
import base64
import contextlib
import json
import logging
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from imgembed import ImageEmbeddingService
from imgembed.api import create_app
from imgembed.config import load_settings
from imgembed.indexing import IndexItem
from tests.conftest import TESTDATA, TINY
from tests.serving import FileServer

PILLOW = TESTDATA / "pillow"
IMAGE = "/api/v1/embeddings/image"
# Files of Pillow's own test corpus, and the status each must get.
HOSTILE = {
    "decompression_bomb.gif": (413, "ImageTooLargeError"),
    "01r_00.pcx": (415, "UnsupportedFormatError"),
    "apng/chunk_no_fctl.png": (400, "InvalidImageError"),
    "7x13.png": (400, "ImageTooSmallError"),
    "broken.png": (400, "InvalidImageError"),
}


@pytest.fixture
def root(photos, tmp_path) -> Path:
    """The allowed root: copies of the photos and of the hostile files."""
    folder = tmp_path / "root"
    folder.mkdir()
    for path in photos:
        shutil.copy(path, folder / path.name)
    for name in HOSTILE:
        shutil.copy(PILLOW / name, folder / Path(name).name)
    return folder


@pytest.fixture
def library():
    """The library's own vectors, to compare the API's with."""
    with ImageEmbeddingService(**TINY, cache_embeddings=False) as service:
        yield service


@contextlib.contextmanager
def _client(wait: bool = True, **settings) -> Iterator[TestClient]:
    """A client of a new app; with `wait`, once its model has loaded."""
    with TestClient(create_app(load_settings(**TINY, **settings))) as client:
        if wait:
            _wait_for_model(client)
        yield client


def _wait_for_model(client: TestClient, headers: dict | None = None) -> None:
    for _ in range(600):
        answer = client.post("/api/v1/embeddings/text", json={"texts": ["x"]}, headers=headers)
        if answer.status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError("the model did not load")


@pytest.fixture
def client(root):
    with _client(allowed_roots=[root]) as client:
        yield client


def _cos(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_one_image_from_every_source_equals_the_library(client, root, library):
    photo = root / "rocket.jpg"
    data = photo.read_bytes()
    expected = library.embed_image(photo)
    bodies = [
        {"image_path": str(photo), "include_metadata": True, "normalize": True},  # the seed's
        {"image_base64": _b64(data)},
        {"image_base64": "data:image/jpeg;base64," + _b64(data)},
    ]
    for body in bodies:
        response = client.post("/api/v1/embeddings/image", json=body)
        assert response.status_code == 200, response.text
        out = response.json()
        assert _cos(out["embedding"], expected) >= 0.99999
        assert (out["dimension"], out["model_name"]) == (64, "imgembed-tiny (seed:0)")
        assert out["processing_time"] > 0 and 0 <= out["confidence"] <= 1
        assert out["error"] is None and len(out["image_id"]) == 64
    assert bodies and out["metadata"] is None  # only when asked
    first = client.post("/api/v1/embeddings/image", json=bodies[0]).json()
    assert first["cached"] is True and first["image_path"] == str(photo)
    assert first["metadata"]["width"] == 640 and "camera_info" not in first["metadata"]
    upload = client.post(
        "/api/v1/embeddings/image",
        files={"file": ("mine.jpg", data, "image/jpeg")},
        data={"include_metadata": "true", "extended": "true", "normalize": "false"},
    )
    assert upload.status_code == 200, upload.text
    out = upload.json()
    assert out["image_path"] == "mine.jpg" and out["normalized"] is False
    assert {"camera_info", "gps_info", "creation_date"} <= out["metadata"].keys()
    assert abs(np.linalg.norm(out["embedding"]) - 1) > 1e-3
    assert _cos(out["embedding"], expected) >= 0.99999
    misnamed = client.post("/api/v1/embeddings/image", files={"image": ("m.jpg", data)})
    assert misnamed.status_code == 422 and "upload it as 'file'" in misnamed.text
    broken = client.post("/api/v1/embeddings/image", files={"file": ("cut.jpg", data[:300])})
    assert broken.status_code == 400 and broken.json()["error"].startswith("cut.jpg: "), broken.text


def test_request_ids_are_echoed(client, root):
    response = client.get("/health")
    assert response.json() == {"status": "ok"} and len(response.headers["x-request-id"]) == 32
    mine = client.get("/health", headers={"X-Request-ID": "trace-42"})
    assert mine.headers["x-request-id"] == "trace-42"
    odd = client.get("/health", headers={"X-Request-ID": "no spaces\nor newlines"})
    assert odd.headers["x-request-id"] != "no spaces\nor newlines"
    error = client.post("/api/v1/embeddings/image", json={"image_path": str(root / "nope.jpg")})
    assert error.json()["request_id"] == error.headers["x-request-id"]


def test_health_and_ready_answer_head_as_load_balancers_probe(client):
    for path in ("/health", "/ready"):
        probed = client.head(path)  # was a 405
        assert probed.status_code == 200 and probed.content == b"", path
        assert probed.headers["content-type"] == "application/json"


def test_every_error_status_from_real_bad_inputs(client, root, photos):
    def status(body):
        response = client.post("/api/v1/embeddings/image", json=body)
        return response.status_code, response.json().get("error_type"), response

    for name, (code, kind) in HOSTILE.items():
        path = root / Path(name).name
        got, got_kind, response = status({"image_path": str(path)})
        assert (got, got_kind) == (code, kind), (name, response.text)
        assert str(path) in response.json()["error"]  # names the input
    assert status({"image_path": str(root / "missing.jpg")})[:2] == (404, "ImageNotFoundError")
    outside = status({"image_path": str(photos[0])})  # a real file, outside the root
    assert outside[:2] == (403, "SourceNotAllowedError")
    assert "allowed roots" in outside[2].json()["error"]
    escape = status({"image_path": str(root / ".." / ".." / photos[0].name)})
    assert escape[:2] == (403, "SourceNotAllowedError")
    assert status({"image_url": "file:///etc/passwd"})[:2] == (403, "SourceNotAllowedError")
    # a URL in the seed's path field: refused (paths are never fetched), saying where URLs go;
    # was "https:// is not fetched: only http(s) URLs are"
    for url in ("https://example.com/product-image.jpg", "HTTP://example.com/a.jpg"):
        in_path = status({"image_path": url})
        assert in_path[:2] == (403, "SourceNotAllowedError"), in_path[2].text
        assert (
            "a URL where a local path is asked for: send URLs as image_url"
            in (in_path[2].json()["error"])
        )
    search = client.post(
        "/api/v1/search/image",
        json={"query_image_path": "https://example.com/q.jpg", "candidate_image_paths": ["a"]},
    )
    assert search.status_code == 403 and "query_image_url" in search.json()["error"]
    assert status({"image_base64": "%%% not base64"})[:2] == (400, "InvalidImageError")
    assert status({"image_base64": _b64(b"not an image")})[:2] == (400, "InvalidImageError")
    two = status({"image_path": str(root / "rocket.jpg"), "image_url": "http://x.example/a"})
    assert two[:2] == (422, "ValidationError") and "exactly one image" in two[2].json()["error"]
    assert status({})[:2] == (422, "ValidationError")
    assert status({"image_path": 5})[:2] == (422, "ValidationError")
    assert status({"image_path": "a", "typo": 1})[:2] == (422, "ValidationError")
    json_type = {"content-type": "application/json"}
    broken = client.post(IMAGE, content=b"{not json", headers=json_type)
    assert broken.status_code == 422 and "invalid JSON" in broken.json()["error"]
    assert client.get("/no/such/route").status_code == 404


def test_an_empty_file_is_said_to_be_empty(client, root):
    """0 bytes were "not a recognised image (unknown format or corrupt)": a file still being
    written, or an upload that sent nothing, is said to be empty, from every source."""
    (root / "empty.png").write_bytes(b"")
    answers = [
        client.post(IMAGE, files={"file": ("empty.png", b"", "image/png")}),
        client.post(IMAGE, json={"image_path": str(root / "empty.png")}),
        client.post(IMAGE, json={"image_base64": "data:image/png;base64,"}),
        client.post(
            "/api/v1/search/image",
            files={"file": ("empty.png", b"")},
            data={"candidate_image_paths": str(root / "rocket.jpg")},
        ),
    ]
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error_type"] == "InvalidImageError"
        assert answer.json()["error"].endswith(": empty (0 bytes): no image in it"), answer.text
    assert answers[0].json()["error"].startswith("empty.png: ")


@pytest.mark.parametrize(
    "content_type", [None, "application/x-www-form-urlencoded", "text/plain", "text/json"]
)
def test_json_under_another_content_type_is_refused_saying_which_to_send(
    client, root, content_type
):
    """curl -d sends a form's content type: every JSON route (ours and FastAPI's) says what
    to send instead, and none reads it as JSON (another site's page could send it)."""
    body = json.dumps({"image_path": str(root / "rocket.jpg"), "text": "a rocket"}).encode()
    headers = {"content-type": content_type} if content_type else {}
    for path in (IMAGE, "/api/v1/embeddings/text", "/api/v1/search/image", "/v1/embeddings"):
        response = client.post(path, content=body, headers=headers)
        assert response.status_code == 422, (path, response.text)
        error = response.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        assert "Content-Type: application/json" in message, (path, message)
        assert f"this request's: {content_type or 'none'}" in message
        assert ("multipart/form-data" in message) == (path in (IMAGE, "/api/v1/search/image"))


def test_urls_keep_the_ssrf_rules_and_fetch_failures_are_502(root, photos, library):
    files = FileServer({"photo.jpg": (root / "rocket.jpg").read_bytes()})
    try:
        with _client(allowed_roots=[root]) as strict:
            refused = strict.post(IMAGE, json={"image_url": files.url("photo.jpg")})
            assert refused.status_code == 403, refused.text  # loopback is private
            assert refused.json()["error_type"] == "SourceNotAllowedError"
        with _client(allowed_roots=[root], allow_private_urls=True, retry_delay=0.01) as client:
            ok = client.post(IMAGE, json={"image_url": files.url("photo.jpg")})
            assert ok.status_code == 200, ok.text
            assert _cos(ok.json()["embedding"], library.embed_image(root / "rocket.jpg")) >= 0.99999
            missing = client.post(IMAGE, json={"image_url": files.url("gone.jpg")})
            assert missing.status_code == 502 and missing.json()["error_type"] == "FetchError"
            assert "404" in missing.json()["error"]
    finally:
        files.close()


def test_without_allowed_roots_no_local_path_is_read(photos):
    with _client() as client:
        response = client.post("/api/v1/embeddings/image", json={"image_path": str(photos[0])})
        assert response.status_code == 403
        assert "IMGEMBED_ALLOWED_ROOTS" in response.json()["error"]
        batch = client.post(
            "/api/v1/embeddings/image/batch",
            json={"images": [{"path": str(photos[0])}, {"base64": _b64(photos[0].read_bytes())}]},
        )
        assert [r["error_type"] for r in batch.json()["results"]] == ["SourceNotAllowedError", None]


def test_a_batch_with_broken_files_answers_every_item_in_order(client, root, library):
    good = [root / "rocket.jpg", root / "coffee.png"]
    body = {
        "image_paths": [str(good[0]), str(root / "broken.png"), str(root / "missing.jpg")],
        "images": [{"base64": _b64(good[1].read_bytes())}, {"url": "ftp://x/y.jpg"}],
        "include_metadata": True,
    }
    response = client.post("/api/v1/embeddings/image/batch", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    kinds = [r["error_type"] for r in out["results"]]
    assert kinds == [None, "InvalidImageError", "ImageNotFoundError", None, "SourceNotAllowedError"]
    assert (out["successful"], out["failed"]) == (2, 3)
    assert _cos(out["results"][0]["embedding"], library.embed_image(good[0])) >= 0.99999
    assert _cos(out["results"][3]["embedding"], library.embed_image(good[1])) >= 0.99999
    assert out["results"][0]["metadata"]["width"] == 640
    assert out["results"][1]["embedding"] is None and "broken.png" in out["results"][1]["error"]
    files = [("files", (p.name, p.read_bytes())) for p in (good[1], root / "broken.png")]
    uploaded = client.post("/api/v1/embeddings/image/batch", files=files).json()
    assert [(r["image_path"], r["error_type"]) for r in uploaded["results"]] == [
        ("coffee.png", None),
        ("broken.png", "InvalidImageError"),
    ]
    empty = client.post("/api/v1/embeddings/image/batch", json={})  # nothing is not a success
    assert empty.status_code == 422 and "at least one image" in empty.json()["error"]
    blank = client.post("/api/v1/embeddings/image/batch", json={"image_paths": [""]}).json()
    (result,) = blank["results"]  # an empty name, not the server's current folder
    assert result["error_type"] == "ImageNotFoundError" and "empty path" in result["error"]


def test_a_debug_server_gives_every_result_its_steps_without_include_metadata(root):
    # The seed's debug mode (IMGEMBED_DEBUG): the library's results carry their steps
    # unasked; the server dropped them with the rest of the metadata unless include_metadata.
    with _client(allowed_roots=[root], debug=True) as client:
        one = client.post(IMAGE, json={"image_path": str(root / "rocket.jpg")}).json()
        assert list(one["metadata"]) == ["debug_logs"]  # the steps, not the metadata
        assert one["metadata"]["debug_logs"][-1]["message"].startswith("done in")
        body = {"image_paths": [str(root / "rocket.jpg"), str(root / "missing.jpg")]}
        results = client.post(f"{IMAGE}/batch", json=body).json()["results"]
        steps = [[e["message"] for e in r["metadata"]["debug_logs"]] for r in results]
        assert "normalised to unit length" in steps[0]
        assert steps[1][0].startswith("failed: ImageNotFoundError")  # where it failed
        full = client.post(
            IMAGE, json={"image_path": str(root / "rocket.jpg"), "include_metadata": True}
        )
        assert full.json()["metadata"]["width"] == 640 and full.json()["metadata"]["debug_logs"]


def test_a_query_id_or_filters_without_a_collection_are_told_to_name_one(client):
    # query_id and filters search a collection only: the default's missing one was answered
    # with "give candidate_image_paths or candidate_images", which these requests refuse (422)
    for body in ({"query_id": "x"}, {"query_text": "a cup", "filters": {"a": 1}}):
        answer = client.post("/api/v1/search/image", json=body)
        assert answer.status_code == 404 and "default collection" in answer.json()["error"]
        assert "candidate" not in answer.json()["error"]
        assert answer.json()["error"].endswith(
            ": give a collection (query_id and filters search one)"
        )


def test_size_and_count_limits_are_413(root):
    with _client(allowed_roots=[root], max_body_size=200_000, max_batch_inputs=3) as client:
        big = {"image_base64": "A" * 300_000}
        response = client.post("/api/v1/embeddings/image", json=big)
        assert response.status_code == 413 and "IMGEMBED_MAX_BODY_SIZE" in response.json()["error"]

        def chunks():  # no Content-Length: counted while it streams
            for _ in range(10):
                yield b"x" * 50_000

        json_type = {"content-type": "application/json"}
        streamed = client.post(IMAGE, content=chunks(), headers=json_type)
        assert streamed.status_code == 413
        many = client.post("/api/v1/embeddings/image/batch", json={"image_paths": ["a"] * 4})
        assert many.status_code == 413 and "IMGEMBED_MAX_BATCH_INPUTS" in many.json()["error"]
        texts = client.post("/api/v1/embeddings/text", json={"texts": ["a"] * 4})
        assert texts.status_code == 413
        assert client.post("/api/v1/embeddings/text", json={"texts": ["a"] * 3}).status_code == 200
        # bodies FastAPI reads itself: over the limit while streaming is 413 there too, not
        # its 400 "error parsing the body"; so are uploads and form fields over the counts
        for path in ("/api/v1/embeddings/text", "/v1/embeddings", "/api/v1/collections"):
            streamed = client.post(path, content=chunks(), headers=json_type)
            assert streamed.status_code == 413, (path, streamed.text)
            assert "IMGEMBED_MAX_BODY_SIZE" in streamed.text
        upload = ("files", ("a.png", b"x"))
        five = client.post("/api/v1/embeddings/image/batch", files=[upload] * 5)
        assert five.status_code == 413, five.text
        assert five.json()["error"] == (
            "more than 4 files in one request, over the limit of 3 inputs "
            "(IMGEMBED_MAX_BATCH_INPUTS)"
        )
        fields = {f"field{i}": "x" for i in range(1_100)}
        crowded = client.post("/api/v1/embeddings/image/batch", data=fields, files=[upload])
        assert crowded.status_code == 413, crowded.text
        assert "more than 1,000 form fields" in crowded.json()["error"]
        text = client.get("/metrics").text  # refused before routing, counted by route
        assert 'route="/api/v1/embeddings/image",status="413"} 2.0' in text
        assert 'route="/v1/embeddings",status="413"} 1.0' in text
        assert "<unmatched>" not in text
    with _client(allowed_roots=[root], max_file_size=50_000) as small:
        upload = small.post(IMAGE, files={"file": ("r.jpg", (root / "rocket.jpg").read_bytes())})
        assert upload.status_code == 413 and upload.json()["error_type"] == "ImageTooLargeError"


def test_texts_and_openai_compatible_embeddings(client, root, library):
    texts = ["a red bicycle", "a cat"]
    expected = library.embed_texts(texts)
    out = client.post("/api/v1/embeddings/text", json={"texts": texts}).json()
    assert out["dimension"] == 64 and out["normalized"] is True
    assert min(_cos(a, b) for a, b in zip(out["embeddings"], expected, strict=True)) >= 0.99999
    assert client.post("/api/v1/embeddings/text", json={"texts": []}).status_code == 422

    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "imgembed-tiny"
    photo = (root / "rocket.jpg").read_bytes()
    data_uri = "data:image/jpeg;base64," + _b64(photo)
    body = {"input": [texts[0], data_uri], "model": "imgembed-tiny"}
    floats = client.post("/v1/embeddings", json=body).json()
    assert floats["object"] == "list" and [d["index"] for d in floats["data"]] == [0, 1]
    assert _cos(floats["data"][0]["embedding"], expected[0]) >= 0.99999
    assert _cos(floats["data"][1]["embedding"], library.embed_image(photo)) >= 0.99999
    packed = client.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    unpacked = np.frombuffer(base64.b64decode(packed["data"][1]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(unpacked, floats["data"][1]["embedding"], atol=1e-7)
    single = client.post("/v1/embeddings", json={"input": "a cat", "model": "imgembed-tiny"})
    assert len(single.json()["data"]) == 1
    plain = {"input": [_b64(photo)], "model": "imgembed-tiny", "modality": "image"}
    forced = client.post("/v1/embeddings", json=plain)
    assert _cos(forced.json()["data"][0]["embedding"], library.embed_image(photo)) >= 0.99999
    by_name = {**plain, "input": [str(root / "rocket.jpg")]}  # a file name, not bad base64
    named = client.post("/v1/embeddings", json=by_name).json()
    assert _cos(named["data"][0]["embedding"], library.embed_image(photo)) >= 0.99999
    # which input is not an image is said by its place in the list, not as "<3 bytes>"
    texts_as_images = client.post("/v1/embeddings", json={**plain, "input": [_b64(photo), "a cat"]})
    assert texts_as_images.status_code == 400
    assert texts_as_images.json()["error"]["message"].startswith("input 1: not a recognised")
    not_base64 = client.post("/v1/embeddings", json={**plain, "input": ["%%%"]})
    assert not_base64.json()["error"]["message"].startswith("input 0: invalid base64")
    outside = client.post("/v1/embeddings", json={**plain, "input": ["/etc/x.jpg"]})
    assert outside.status_code == 403 and "allowed roots" in outside.json()["error"]["message"]
    wrong = client.post("/v1/embeddings", json={**body, "dimensions": 32})
    assert wrong.status_code == 422 and "64 dimensions" in wrong.json()["error"]["message"]
    other = client.post("/v1/embeddings", json={**body, "model": "text-embedding-3-small"})
    assert other.status_code == 404 and other.json()["error"]["type"] == "UnknownModelError"
    assert other.json()["error"]["code"] == "model_not_found"  # as OpenAI says it
    tokens = client.post("/v1/embeddings", json={"input": [1, 2, 3], "model": "imgembed-tiny"})
    assert tokens.status_code == 422 and tokens.json()["error"]["type"] == "ValidationError"
    assert "token arrays" in tokens.json()["error"]["message"]
    empty = client.post("/v1/embeddings", json={"input": [], "model": "imgembed-tiny"})
    assert empty.status_code == 422 and "input is empty" in empty.json()["error"]["message"]
    bad_image = client.post(
        "/v1/embeddings", json={"input": "data:image/png;base64," + _b64(b"junk"), "model": "x"}
    )
    assert bad_image.status_code == 404  # the model is checked first
    bad_image = client.post(
        "/v1/embeddings",
        json={"input": "data:image/png;base64," + _b64(b"junk"), "model": "imgembed-tiny"},
    )
    assert bad_image.status_code == 400 and bad_image.json()["error"]["type"] == "InvalidImageError"


def test_search_among_candidates(client, root, library):
    names = ["rocket.jpg", "coffee.png", "chelsea.png", "astronaut.png"]
    body = {
        "query_image_path": str(root / "coffee.png"),
        "candidate_image_paths": [str(root / n) for n in names] + [str(root / "broken.png")],
        "top_k": 3,
    }
    out = client.post("/api/v1/search/image", json=body).json()
    assert [r["rank"] for r in out["results"]] == [1, 2, 3]
    assert out["results"][0]["image_path"] == str(root / "coffee.png")
    assert out["results"][0]["similarity_score"] == pytest.approx(1, abs=1e-5)
    scores = [r["similarity_score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    query = library.embed_image(root / "coffee.png")
    for hit in out["results"]:
        expected = _cos(query, library.embed_image(hit["image_path"]))
        assert hit["similarity_score"] == pytest.approx(expected, abs=1e-4)
    assert out["failed"][0]["error_type"] == "InvalidImageError" and out["collection"] is None
    by_text = client.post(
        "/api/v1/search/image",
        json={"query_text": "a cup", "candidate_images": [{"path": str(root / n)} for n in names],
              "include_embeddings": True},
    ).json()  # fmt: skip
    assert len(by_text["results"]) == 4 and len(by_text["results"][0]["embedding"]) == 64
    query = {"file": ("q.png", (root / "chelsea.png").read_bytes())}
    paths = [str(root / n) for n in names[:2]]
    for form in ({"candidate_image_paths": paths}, {"candidate_image_paths": json.dumps(paths)}):
        upload = client.post("/api/v1/search/image", files=query, data=form)  # repeated / JSON
        assert upload.status_code == 200, upload.text
        assert sorted(r["image_path"] for r in upload.json()["results"]) == sorted(paths)
    filters = client.post("/api/v1/search/image", files=query, data={"filters": "kind=cup"})
    assert filters.status_code == 422 and "JSON object" in filters.text
    no_query = client.post("/api/v1/search/image", json={"candidate_image_paths": []})
    assert no_query.status_code == 422
    # a seed request without its candidates searched the default collection, not made yet
    default = client.post("/api/v1/search/image", json={"query_text": "a cup"})
    assert default.status_code == 404 and default.json()["error"].startswith("no collection")
    assert default.json()["error"].endswith(
        "(the server's default collection, searched as the request names no collection): give "
        "candidate_image_paths or candidate_images to search among those images, or a collection"
    )
    named = client.post("/api/v1/search/image", json={"query_text": "a cup", "collection": "c"})
    assert named.status_code == 404 and "default" not in named.json()["error"]
    blank = client.post("/api/v1/search/image", json={"query_text": " ", "collection": "c"})
    assert blank.status_code == 422 and "search text is empty" in blank.json()["error"]
    assert blank.json()["error_type"] == "ValidationError"  # like any malformed body
    # nothing to search among, or a name that is empty: malformed, not "no results"
    for empty in ({"query_text": "a cup", "candidate_image_paths": []},
                  {"query_text": "a cup", "candidate_images": []},
                  {"query_text": "a cup", "collection": ""},
                  {"query_image_path": "", "collection": "c"}):  # fmt: skip
        refused = client.post("/api/v1/search/image", json=empty)
        assert refused.status_code == 422, empty
        assert refused.json()["error_type"] == "ValidationError", empty
        assert "Value error" not in refused.json()["error"], refused.json()  # pydantic's prefix
    no_path = client.post("/api/v1/embeddings/image", json={"image_path": ""})
    assert (no_path.status_code, no_path.json()["error_type"]) == (422, "ValidationError")
    deep = "[" * 100_000 + "]" * 100_000  # json's recursion limit: malformed, not a 500
    for route in ("/api/v1/embeddings/image", "/api/v1/search/image"):
        refused = client.post(route, content=deep, headers={"Content-Type": "application/json"})
        assert (refused.status_code, refused.json()["error_type"]) == (422, "ValidationError")
        assert "nested too deeply" in refused.json()["error"]
    # a NUL character in one path fails that item, typed; the good one is embedded
    good = str(root / names[0])
    batch = client.post("/api/v1/embeddings/image/batch",
                        json={"image_paths": [good, good + "\u0000x"]})  # fmt: skip
    assert batch.status_code == 200, batch.text
    items = batch.json()["results"]
    assert items[0]["embedding"] and items[1]["error_type"] == "InvalidImageError"


def test_openapi_docs_and_metrics(client, root):
    schema = client.get("/openapi.json").json()
    for path in ("/api/v1/embeddings/image", "/api/v1/embeddings/image/batch",
                 "/api/v1/embeddings/text", "/api/v1/search/image", "/v1/embeddings",
                 "/v1/models", "/api/v1/collections", "/api/v1/jobs/{job_id}", "/health",
                 "/ready", "/metrics"):  # fmt: skip
        assert path in schema["paths"], path
    body = schema["paths"]["/api/v1/embeddings/image"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= body.keys()
    assert "image_path" in body["application/json"]["schema"]["properties"]
    assert "swagger" in client.get("/docs").text.lower()
    assert client.get("/redoc").status_code in (401, 404)  # one docs page: no ReDoc
    for _ in range(2):  # the second is a cache hit
        client.post("/api/v1/embeddings/image", json={"image_path": str(root / "rocket.jpg")})
    client.post("/api/v1/embeddings/image", json={"image_path": str(root / "broken.png")})
    text = client.get("/metrics").text
    requests = 'imgembed_requests_total{method="POST",route="/api/v1/embeddings/image"'
    assert requests + ',status="200"} 2.0' in text
    assert 'route="/api/v1/embeddings/image",status="400"} 1.0' in text
    assert 'imgembed_images_total{outcome="cached"} 1.0' in text
    assert 'imgembed_images_total{outcome="failed"} 1.0' in text
    assert 'imgembed_batch_size_count{kind="image"}' in text
    assert "imgembed_request_seconds_bucket" in text and "imgembed_queue_depth 0.0" in text
    assert "imgembed_images_per_second" in text


def test_access_logs_are_json_and_never_hold_images_or_keys(root, caplog):
    secret = "s3cret-key-0123456789"
    payload = _b64((root / "rocket.jpg").read_bytes())
    with (
        caplog.at_level(logging.INFO, logger="imgembed"),
        _client(False, allowed_roots=[root], api_keys=secret) as client,
    ):
        auth = {"Authorization": f"Bearer {secret}"}
        _wait_for_model(client, auth)
        response = client.post(IMAGE, json={"image_base64": payload}, headers=auth)
        assert response.status_code == 200
    records = [r for r in caplog.records if r.name == "imgembed.access"]
    mine = [r for r in records if r.fields["request_id"] == response.headers["x-request-id"]]
    assert len(mine) == 1 and mine[0].fields["status"] == 200
    assert mine[0].fields["route"] == "/api/v1/embeddings/image"
    from imgembed.api.logs import JsonFormatter

    line = json.loads(JsonFormatter().format(mine[0]))
    assert line["message"] == "request" and line["duration_ms"] > 0
    everything = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert secret not in everything and payload[:200] not in everything


def test_api_keys_guard_everything_but_health(root):
    with _client(False, allowed_roots=[root], api_keys="k1,k2") as client:
        assert client.get("/health").status_code == 200
        page = client.get("/")  # the page and its files hold no data
        assert page.status_code == 200 and '<script src="/static/app.js">' in page.text
        assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/static/secrets.txt").status_code == 404
        refused = client.post("/api/v1/embeddings/text", json={"texts": ["x"]})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error_type"] == "Unauthorized"
        assert client.get("/metrics").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "k2"}).status_code == 401
        for key in ("k1", "k2"):
            auth = {"Authorization": f"Bearer {key}"}
            assert client.get("/v1/models", headers=auth).status_code == 200


def test_cors_is_off_by_default_and_on_when_configured(root):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with _client(allowed_roots=[root]) as client:
        response = client.get("/health", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers
        assert client.options("/api/v1/embeddings/text", headers=preflight).status_code != 200
    cors = {"cors_origins": "https://app.example", "api_keys": "k"}
    with _client(False, allowed_roots=[root], **cors) as client:
        response = client.options("/api/v1/embeddings/text", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_not_ready_while_the_model_loads(root, monkeypatch):
    import imgembed.service

    release = threading.Event()
    real = imgembed.service.create_encoder

    def slow(ref, settings):
        release.wait(timeout=60)
        return real(ref, settings)

    monkeypatch.setattr(imgembed.service, "create_encoder", slow)
    with _client(False, allowed_roots=[root]) as client:
        assert client.get("/health").status_code == 200
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["model"] == "loading"
        assert int(ready.headers["retry-after"]) >= 1
        busy = client.post("/api/v1/embeddings/text", json={"texts": ["x"]})
        assert busy.status_code == 503 and busy.json()["error_type"] == "UnavailableError"
        assert int(busy.headers["retry-after"]) >= 1
        release.set()
        _wait_for_model(client)
        assert client.get("/ready").json() == {"status": "ready", "model": True, "store": True}


def test_a_hanging_database_holds_only_the_requests_that_need_it(root, monkeypatch):
    """Searches and readiness probes waiting on a database that does not answer (down, or
    restarting) must not take the threads that image requests read their files on."""
    from concurrent.futures import ThreadPoolExecutor

    from imgembed.api import state as api_state
    from imgembed.errors import StoreUnavailableError
    from imgembed.store.postgres import PostgresStore

    monkeypatch.setattr(api_state, "READY_STORE_SECONDS", 0.5)
    hang, hanging = threading.Event(), []

    def provenance(store, *args):
        hanging.append(args)
        hang.wait(timeout=120)
        raise StoreUnavailableError("the database went away (a test)")

    with _client(allowed_roots=[root]) as client, ThreadPoolExecutor(72) as pool:
        monkeypatch.setattr(PostgresStore, "provenance", provenance)
        monkeypatch.setattr(PostgresStore, "collections", provenance)
        search = {"query_text": "a cat", "collection": "photos"}
        waiting = [pool.submit(client.post, "/api/v1/search/image", json=search)
                   for _ in range(20)]  # fmt: skip
        # plain routes wait on the database in FastAPI's own pool (40 threads): more of them
        listing = [pool.submit(client.get, "/api/v1/collections") for _ in range(45)]
        for _ in range(600):  # the first of them opens the store (starts its server)
            if len(hanging) >= 50:
                break
            time.sleep(0.1)
        assert len(hanging) >= 50 and not any(w.done() for w in waiting + listing)
        probes = [pool.submit(client.get, "/ready") for _ in range(3)]
        for probe in probes:  # each answers while the searches still wait
            ready = probe.result(timeout=60)
            assert ready.status_code == 503 and "not answering" in ready.json()["store"]
        for _ in range(3):  # image requests: their paths resolved on the threads they need
            answer = pool.submit(client.post, "/api/v1/embeddings/image",
                                 json={"image_path": str(root / "rocket.jpg")})  # fmt: skip
            assert answer.result(timeout=60).status_code == 200  # not behind the database
        hang.set()
        for future in waiting + listing:
            failed = future.result(timeout=120)
            assert failed.status_code == 503 and failed.headers["retry-after"] == "5"


def test_malformed_bodies_are_a_typed_422_never_a_500_or_an_untyped_400(client, root):
    deep = "[" * 100_000 + "]" * 100_000
    photo = ("q.jpg", (root / "rocket.jpg").read_bytes())
    answers = [
        client.post("/api/v1/embeddings/text", content=deep,
                    headers={"Content-Type": "application/json"}),
        client.post("/v1/embeddings", content='{"input": ' + deep + ', "model": "x"}',
                    headers={"Content-Type": "application/json"}),
        client.post("/api/v1/search/image", json={"query_text": "x", "filters": deep}),
        client.post("/api/v1/search/image", files={"file": photo}, data={"filters": deep}),
        client.post("/api/v1/search/image", content=b"--x\r\nno headers\r\n--x--\r\n",
                    headers={"Content-Type": "multipart/form-data"}),  # no boundary
        client.post("/api/v1/search/image", content=b"--x\r\n\r\nbody\r\n--x--\r\n",
                    headers={"Content-Type": "multipart/form-data; boundary=x"}),
    ]  # fmt: skip
    for n, answer in enumerate(answers):
        error = answer.json()["error"]
        kind = error["type"] if isinstance(error, dict) else answer.json()["error_type"]  # /v1
        assert (answer.status_code, kind) == (422, "ValidationError"), (n, answer.text[:300])
    # a list field that is not JSON is the one value it names: an odd path, which fails
    odd = client.post("/api/v1/search/image", files={"file": photo},
                      data={"candidate_image_paths": deep})  # fmt: skip
    assert odd.status_code == 200 and odd.json()["failed"][0]["error_type"].endswith("Error")


def test_a_path_that_is_not_utf8_is_refused_not_read_as_another_name(client):
    body = {"products": [{"id": "1", "title": "x"}], "embed": False}
    for path in ("/api/v1/stores/%FF/products", "/api/v1/stores/%FE/products"):
        answer = client.post(path, json=body)  # both would be the store "\ufffd"
        assert (answer.status_code, answer.json()["error_type"]) == (422, "ValidationError")
    assert client.get("/api/v1/stores").json() == []
    accented = client.post("/api/v1/stores/caf%C3%A9/products", json=body)
    assert accented.status_code == 200
    assert client.get("/api/v1/stores").json()[0]["store_id"] == "café"


def test_a_lone_surrogate_in_a_path_is_that_inputs_error_never_a_500(client, root):
    """JSON may escape half a surrogate pair ("\\ud800"), which no JSON answer can hold: an
    input naming one fails alone, and its label and message show the escape."""

    def send(path, body):  # json.dumps escapes it, as a client's JSON would
        headers = {"Content-Type": "application/json"}
        return client.post(path, content=json.dumps(body), headers=headers)

    rocket = str(root / "rocket.jpg")
    batch = send(f"{IMAGE}/batch", {"image_paths": ["\ud800", rocket],
                                    "images": [{"url": "http://\ud800"}]})  # fmt: skip
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [r["error_type"] is None for r in results] == [False, True, False], results
    assert results[0]["image_path"] == "\\ud800"
    assert results[0]["error"].startswith("\\ud800: not a usable path")
    assert results[2]["image_path"] == "http://\\ud800"
    search = send("/api/v1/search/image",
                  {"query_text": "x", "candidate_image_paths": ["\ud800", rocket]})  # fmt: skip
    assert search.status_code == 200, search.text
    assert search.json()["failed"][0]["image_path"] == "\\ud800"
    assert search.json()["results"][0]["image_path"] == rocket
    index = send("/api/v1/collections/c/index", {"sources": ["\ud800"]})
    assert (index.status_code, index.json()["error_type"]) == (400, "InvalidImageError")
    assert index.json()["error"].startswith("\\ud800: ")


def test_a_body_that_stops_arriving_is_a_408_and_frees_its_connection(monkeypatch):
    """A client trickling (or stopping) its body held the connection for ever."""
    import socket

    from imgembed.api import middleware
    from tests.serving import serve_in_thread

    monkeypatch.setattr(middleware, "BODY_IDLE_SECONDS", 1.0)
    app = create_app(load_settings(**TINY))
    with serve_in_thread(app) as base:
        port = int(base.rsplit(":", 1)[1])
        starts = {
            "/api/v1/embeddings/text": ("application/json", b'{"texts": ["a'),
            "/api/v1/embeddings/image": ("multipart/form-data; boundary=x", b"--x\r\nContent-"),
        }
        for path, (kind, start) in starts.items():
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {kind}\r\n"
                sock.sendall(f"{head}Content-Length: 1000\r\n\r\n".encode() + start)
                answer = ""
                while not answer.endswith("}") and (part := sock.recv(65536)):
                    answer += part.decode()
            assert answer.startswith("HTTP/1.1 408"), answer
            assert '"error_type":"RequestTimeoutError"' in answer and "stopped arriving" in answer


def test_a_connection_without_a_whole_request_is_a_408_and_closed(monkeypatch):
    """A client that connects and sends nothing, or trickles its headers (slowloris), held
    its connection for ever: uvicorn has no deadline for a request's head. A whole request
    on the same kind of connection is not hurried by it."""
    import socket

    import httpx

    from imgembed.api import protocol
    from tests.serving import serve_in_thread

    monkeypatch.setattr(protocol, "IDLE_SECONDS", 3.0)
    with serve_in_thread(create_app(load_settings(**TINY)), ready="/health") as base:
        port = int(base.rsplit(":", 1)[1])

        def answer(sock) -> str:
            text = ""
            while part := sock.recv(65536):
                text += part.decode()
            return text

        with socket.create_connection(("127.0.0.1", port), timeout=60) as silent:
            text = answer(silent)
            assert text.startswith("HTTP/1.1 408") and '"error_type": "RequestTimeoutError"' in text
        with socket.create_connection(("127.0.0.1", port), timeout=60) as trickle:
            trickle.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            deadline = time.monotonic() + 20
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                while True:  # a byte each 0.1 s: no byte renews the deadline
                    assert time.monotonic() < deadline, "the trickling head was never cut off"
                    trickle.sendall(b"a")
                    time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as answered:
            # a body the server answered (413: over the limit) before reading it, trickled
            head = b"POST /api/v1/embeddings/text HTTP/1.1\r\nHost: t\r\n"
            answered.sendall(head + b"Content-Length: 999999999\r\n\r\n")
            deadline = time.monotonic() + 20
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                while True:
                    assert time.monotonic() < deadline, "the trickling body was never cut off"
                    answered.sendall(b"a")
                    time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as fine:
            time.sleep(0.5)
            fine.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert answer(fine).startswith("HTTP/1.1 200")
        with httpx.Client(base_url=base) as client:  # keep-alive: a second request on it
            assert client.get("/health").status_code == 200
            time.sleep(3.5)  # idle past the deadline, within uvicorn's keep-alive (5 s)
            assert client.get("/health").status_code == 200


def test_not_ready_for_good_when_the_model_cannot_load(root, monkeypatch):
    import imgembed.service
    from imgembed.errors import ModelUnavailableError

    def missing(ref, settings):
        raise ModelUnavailableError("no weights for this model here")

    monkeypatch.setattr(imgembed.service, "create_encoder", missing)
    with _client(False, allowed_roots=[root]) as client:
        deadline = time.monotonic() + 60
        while (ready := client.get("/ready")).json()["model"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ready.status_code == 503 and "no weights" in ready.json()["model"]
        assert "retry-after" not in ready.headers  # asking again will not help


def test_a_data_dir_that_is_a_file_is_the_servers_fault_not_the_requests(root, tmp_path):
    in_the_way = tmp_path / "data"
    in_the_way.write_text("not a folder")
    with _client(data_dir=in_the_way, allowed_roots=[root]) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503 and "is a file" in ready.json()["store"]
        listed = client.get("/api/v1/collections")
        assert listed.status_code == 503, listed.text  # not 422: the request is fine
        assert listed.json()["error_type"] == "DataDirError"
        assert "set IMGEMBED_DATA_DIR to a folder" in listed.json()["error"]
        # the operator's to fix: OpenAI-style clients are told not to repeat it
        assert listed.headers["x-should-retry"] == "false"
        assert "retry-after" not in listed.headers


def test_a_body_that_is_not_utf8_is_a_422_on_every_json_route(client):
    bad = b'{"texts": ["\xff\xfe"]}'
    for path in ("/api/v1/embeddings/text", "/v1/embeddings", "/api/v1/collections", IMAGE):
        response = client.post(path, content=bad, headers={"content-type": "application/json"})
        assert response.status_code == 422, (path, response.text)
        assert "can't decode byte 0xff" in response.text


def test_a_client_gone_mid_body_is_a_499_in_metrics_not_a_bug(root, caplog):
    """The client hangs up while sending its body: no answer is possible, and it is no bug
    (a 500 in metrics would page someone)."""
    app = create_app(load_settings(**TINY, allowed_roots=[root]))

    async def post_and_hang_up(path: str) -> list[dict]:
        arriving = [
            {"type": "http.request", "body": b'{"texts": ["a', "more_body": True},
            {"type": "http.disconnect"},
        ]
        sent = []

        async def receive():
            return arriving.pop(0) if arriving else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
                 "root_path": "", "scheme": "http", "query_string": b"", "server": ("t", 80),
                 "headers": [(b"content-type", b"application/json")], "client": ("c", 1),
                 "http_version": "1.1", "app": app}  # fmt: skip
        await app(scope, receive, send)
        return sent

    with caplog.at_level(logging.INFO, logger="imgembed"):
        for path in ("/api/v1/embeddings/text", IMAGE):
            assert asyncio.run(post_and_hang_up(path)) == []  # nothing sent to no one
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    text = TestClient(app).get("/metrics").text
    assert 'route="/api/v1/embeddings/text",status="499"} 1.0' in text
    assert 'route="/api/v1/embeddings/image",status="499"} 1.0' in text
    assert 'status="500"' not in text


def test_a_bug_is_a_500_with_the_request_id(client, monkeypatch):
    from imgembed.engine.batcher import Batcher

    async def broken(self, texts):
        raise ValueError("a bug")

    monkeypatch.setattr(Batcher, "embed_texts", broken)
    response = client.post("/api/v1/embeddings/text", json={"texts": ["x"]})
    assert response.status_code == 500 and response.json()["error_type"] == "InternalError"
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert "a bug" not in response.text  # details go to the log, not to the client


def _job(client, response):
    assert response.status_code == 202, response.text
    url = response.json()["url"]
    for _ in range(1200):
        job = client.get(url).json()
        assert job["job_id"] == response.json()["job_id"]  # the same key in both
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job did not finish: {job}")


def test_clients_name_only_the_models_the_server_offers():
    """IMGEMBED_ALLOWED_MODELS: before, a client could make the server download and hold any
    known model (ViT-bigG-14: 10 GB of RAM) by creating a collection with it."""
    with _client(allowed_models=["EfficientNet-Lite0"]) as client:
        for name, model in (("own", "imgembed-tiny"), ("other", "efficientnet-lite0")):
            created = client.post("/api/v1/collections", json={"name": name, "model": model})
            assert (created.status_code, created.json()["model"]) == (201, model), created.text
        refused = client.post("/api/v1/collections", json={"name": "big", "model": "ViT-B-32"})
        assert (refused.status_code, refused.json()["error_type"]) == (
            403, "SourceNotAllowedError"), refused.text  # fmt: skip
        assert "offers only imgembed-tiny, EfficientNet-Lite0" in refused.json()["error"]
        typo = client.post("/api/v1/collections", json={"name": "big", "model": "ViT-Q-99"})
        assert typo.status_code == 403 and "offers only" in typo.json()["error"]
        names = {c["name"] for c in client.get("/api/v1/collections").json()}
        assert names == {"own", "other"}
    # the server's own model with another tag may be named; and an existing collection of a
    # model no longer offered is answered as it is (200), without loading it
    with _client(allowed_models=[]) as client:
        other = client.post(
            "/api/v1/collections", json={"name": "other", "model": "efficientnet-lite0"}
        )
        assert (other.status_code, other.json()["count"]) == (200, 0), other.text
        fresh = client.post(
            "/api/v1/collections", json={"name": "fresh", "model": "efficientnet-lite0"}
        )
        assert fresh.status_code == 403, fresh.text
        tagged = client.post("/api/v1/collections", json={
            "name": "seed1", "model": "imgembed-tiny", "pretrained": "seed:1"})  # fmt: skip
        assert (tagged.status_code, tagged.json()["pretrained"]) == (201, "seed:1"), tagged.text


def test_collections_index_search_duplicates_thumbnails(data_dir, root, library, photos, tmp_path):
    with _client(allowed_roots=[root]) as client:
        created = client.post("/api/v1/collections", json={"name": "shop"})
        assert created.status_code == 201
        slashed = client.post("/api/v1/collections", json={"name": "a/b"})  # unreachable
        assert slashed.status_code == 422 and "'/'" in slashed.json()["error"]
        assert created.json() == {"name": "shop", "backend": "postgres", "model": "imgembed-tiny",
                                  "pretrained": "seed:0", "dimension": 64, "count": 0,
                                  "has_text_tower": True}  # fmt: skip
        # another model without a tag gets that model's own (not this server's seed:0)
        other = client.post(
            "/api/v1/collections", json={"name": "m2", "model": "efficientnet-lite0"}
        )
        assert (other.status_code, other.json()["pretrained"]) == (201, "imagenet"), other.text
        # no model named: an existing collection as it is, with its own model (as index and
        # search use it); naming another model than its own is a 409
        again = client.post("/api/v1/collections", json={"name": "m2"})
        assert (again.status_code, again.json()["model"]) == (200, "efficientnet-lite0")
        clash = client.post("/api/v1/collections", json={"name": "m2", "model": "imgembed-tiny"})
        assert (clash.status_code, clash.json()["error_type"]) == (409, "ProvenanceMismatchError")
        assert client.delete("/api/v1/collections/m2").status_code == 200
        # no such model, or no such tag of one: the request's fault (a 500 for a name too long
        # for a file name; a 503 after trying to load one with a colon, or an unknown tag)
        for model in ({"model": "ViT-Q-99"}, {"model": "x" * 300}, {"model": "a:b"},
                      {"model": "hf-hub:"},
                      {"model": "imgembed-tiny", "pretrained": "no-such-tag"},
                      # a checkpoint or folder in the roots that is not there (was a 503)
                      {"model": "imgembed-tiny", "pretrained": str(root / "missing.pt")},
                      {"model": f"local-dir:{root / 'missing'}"}):  # fmt: skip
            unknown = client.post("/api/v1/collections", json={"name": "m3", **model})
            assert (unknown.status_code, unknown.json()["error_type"]) == (
                422, "UnknownModelError"), unknown.text[:300]  # fmt: skip
        # a client loads no model file from outside the allowed roots (before: any .pt on
        # the server's disk, any local-dir: folder); inside them it may
        outside = tmp_path / "tiny.pt"
        torch.save(open_clip.create_model("imgembed-tiny").state_dict(), outside)
        for model in ({"model": "imgembed-tiny", "pretrained": str(outside)},
                      {"model": f"local-dir:{tmp_path}"}):  # fmt: skip
            refused = client.post("/api/v1/collections", json={"name": "m4", **model})
            assert (refused.status_code, refused.json()["error_type"]) == (
                403, "SourceNotAllowedError"), refused.text  # fmt: skip
        inside = root / "tiny.pt"
        shutil.copy(outside, inside)
        allowed = client.post("/api/v1/collections", json={
            "name": "m4", "model": "imgembed-tiny", "pretrained": str(inside)})  # fmt: skip
        assert (allowed.status_code, allowed.json()["pretrained"]) == (201, str(inside))
        assert client.delete("/api/v1/collections/m4").status_code == 200
        inside.unlink()
        existing = client.post("/api/v1/collections", json={"name": "shop"})
        assert existing.status_code == 200 and existing.json()["name"] == "shop"
        nothing = client.post("/api/v1/collections/shop/index", json={})
        assert nothing.status_code == 422 and "what to index" in nothing.json()["error"]
        empty_folder = root / "empty"
        empty_folder.mkdir()
        emptied = _job(client, client.post("/api/v1/collections/shop/index", json={
            "sources": [str(empty_folder)], "prune": True}))  # fmt: skip
        assert emptied["stats"]["failed"] == 1 and emptied["stats"]["prune_skipped"], emptied
        assert "folder holds no images" in emptied["stats"]["failures"][0]["error"]
        copy = root / "copy-of-rocket.jpg"
        copy.write_bytes((root / "rocket.jpg").read_bytes())
        job = _job(client, client.post("/api/v1/collections/shop/index", json={
            "sources": [str(root / "rocket.jpg"), str(root / "coffee.png"), str(copy),
                        str(root / "broken.png")],
            "items": [{"id": "sku-1", "source": str(root / "chelsea.png"),
                       "metadata": {"category": "cats"}}],
        }))  # fmt: skip
        assert job["status"] == "done", job
        stats = job["stats"]
        assert (stats["total"], stats["successful"], stats["failed"]) == (5, 4, 1)
        assert stats["failures"][0]["error_type"] == "InvalidImageError"
        assert job["progress"]["done"] == 5
        # a file named in sources and in items is one item: the 202's total is the job's
        rocket = str(root / "rocket.jpg")
        twice = client.post("/api/v1/collections/shop/index", json={
            "sources": [rocket], "items": [{"source": rocket}]})  # fmt: skip
        assert twice.json()["total"] == 1, twice.text
        assert _job(client, twice)["stats"]["total"] == 1
        # a job's images count in the server's metrics, as a request's do
        counted = {
            outcome: float(value)
            for outcome, value in re.findall(
                r'imgembed_images_total\{outcome="(\w+)"\} ([\d.]+)',
                client.get("/metrics").text,
            )
        }
        assert counted.get("embedded", 0) + counted.get("cached", 0) == 4, counted
        assert counted["failed"] == 1
        listed = client.get("/api/v1/collections").json()
        assert [(c["name"], c["count"]) for c in listed] == [("shop", 4)]

        by_image = client.post("/api/v1/search/image", json={
            "query_image_path": str(root / "coffee.png"), "collection": "shop", "top_k": 2,
        }).json()  # fmt: skip
        assert by_image["results"][0]["image_path"] == str(root / "coffee.png")
        assert by_image["results"][0]["similarity_score"] == pytest.approx(1, abs=1e-5)
        assert by_image["collection"] == "shop" and len(by_image["results"]) == 2
        assert [r["embedding"] for r in by_image["results"]] == [None, None]
        with_vectors = client.post("/api/v1/search/image", json={
            "query_image_path": str(root / "coffee.png"), "collection": "shop", "top_k": 2,
            "include_embeddings": True,
        }).json()["results"]  # fmt: skip
        own, second = (np.asarray(r["embedding"]) for r in with_vectors)
        assert own.shape == (64,) and np.linalg.norm(own) == pytest.approx(1, abs=1e-5)
        # the first hit is the query's own item: its stored vector scores the second hit
        assert float(own @ second) == pytest.approx(with_vectors[1]["similarity_score"], abs=1e-4)
        filtered = client.post("/api/v1/search/image", json={
            "query_text": "a cat", "collection": "shop", "filters": {"category": "cats"},
        }).json()  # fmt: skip
        assert [r["metadata"]["id"] for r in filtered["results"]] == ["sku-1"]
        more = client.post("/api/v1/search/image", json={
            "query_id": str(root / "rocket.jpg"), "collection": "shop", "top_k": 2,
        }).json()  # fmt: skip
        assert {r["image_path"] for r in more["results"]} == {str(root / "rocket.jpg"), str(copy)}
        unknown = client.post("/api/v1/search/image", json={"query_id": "x", "collection": "shop"})
        assert unknown.status_code == 404

        dupes = client.get("/api/v1/collections/shop/duplicates").json()
        assert dupes["threshold"] == 0.92
        assert any({g["source"] for g in group} >= {str(root / "rocket.jpg"), str(copy)}
                   for group in dupes["groups"])  # fmt: skip

        thumb = client.get("/api/v1/collections/shop/thumbnail", params={"id": "sku-1", "size": 64})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(BytesIO(thumb.content)).size) == 64
        missing = client.get("/api/v1/collections/shop/thumbnail", params={"id": "nope"})
        assert missing.status_code == 404
        # an item indexed by the library from outside the roots: its file is never served
        library.index([IndexItem("outside", str(photos[0]))], "shop")
        refused = client.get("/api/v1/collections/shop/thumbnail", params={"id": "outside"})
        assert refused.status_code == 403
        client.request("DELETE", "/api/v1/collections/shop/items", json={"ids": ["outside"]})
        items = "/api/v1/collections/shop/items"
        deleted = client.request("DELETE", items, json={"ids": ["sku-1"]})
        assert deleted.json() == {"deleted": 1}
        assert client.get("/api/v1/collections").json()[0]["count"] == 3

        outside = client.post("/api/v1/collections/shop/index", json={"sources": [str(tmp_path)]})
        assert outside.status_code == 403  # a folder outside the roots is never listed
        seed1 = {"name": "shop", "model": "imgembed-tiny", "pretrained": "seed:1"}
        other_model = client.post("/api/v1/collections", json=seed1)
        assert other_model.status_code == 409
        assert other_model.json()["error_type"] == "ProvenanceMismatchError"
        assert client.get("/api/v1/jobs/nope").status_code == 404
        assert client.request("DELETE", "/api/v1/collections/shop").json() == {"dropped": "shop"}

        # a collection of another model is indexed and searched with that model
        other = client.post("/api/v1/collections", json={**seed1, "name": "other"})
        assert other.status_code == 201 and other.json()["pretrained"] == "seed:1"
        job = _job(client, client.post("/api/v1/collections/other/index", json={
            "sources": [str(root / "rocket.jpg"), str(root / "coffee.png")]}))  # fmt: skip
        assert job["stats"]["successful"] == 2
        query = {"query_image_path": str(root / "coffee.png"), "collection": "other"}
        found = client.post("/api/v1/search/image", json=query).json()
        assert found["model_name"] == "imgembed-tiny (seed:1)"
        assert found["results"][0]["similarity_score"] == pytest.approx(1, abs=1e-5)
        gone = client.post("/api/v1/search/image", json={"query_text": "x", "collection": "shop"})
        assert gone.status_code == 404 and gone.json()["error_type"] == "CollectionNotFoundError"


def test_a_collection_another_process_indexes_is_refused_before_a_job_starts(data_dir, root):
    """While a CLI `index` in another process holds the collection: 409 up front, not a job
    that embeds everything again. Behind this server's own run it queues."""
    import psycopg

    from imgembed.store import embedded

    body = {"sources": [str(root / "rocket.jpg"), str(root / "coffee.png")]}
    with _client(allowed_roots=[root]) as client:
        with psycopg.connect(embedded.start(data_dir)) as holder:
            holder.execute("SELECT pg_advisory_lock(hashtextextended('imgembed-index:shop', 0))")
            refused = client.post("/api/v1/collections/shop/index", json=body)
            assert refused.status_code == 409, refused.text
            assert refused.json()["error_type"] == "StoreBusyError"
            assert "another indexing run" in refused.json()["error"]
            assert client.post("/api/v1/collections/other/index", json=body).status_code == 202
        release = threading.Event()
        service = client.app.state.imgembed.service

        def own_run(progress):
            with service.store.writing("shop"):
                release.wait(60)

        own = client.app.state.imgembed.jobs.submit("index", "shop", 0, own_run)
        while client.get(f"/api/v1/jobs/{own.id}").json()["status"] == "queued":
            time.sleep(0.05)
        queued = client.post("/api/v1/collections/shop/index", json=body)
        assert queued.status_code == 202, queued.text
        release.set()
        done = _job(client, queued)
        assert (done["status"], done["stats"]["successful"]) == ("done", 2), done


@pytest.fixture
def slow_crops(root, monkeypatch) -> list[str]:
    """24 distinct crops of a photo, and an encoder that takes 0.3 s a batch: jobs that run
    long enough to watch, cancel or stop."""
    import imgembed.service
    from tests.fakes import FakeEncoder

    real = imgembed.service.create_encoder
    monkeypatch.setattr(
        imgembed.service, "create_encoder", lambda ref, s: FakeEncoder(real(ref, s), delay=0.3)
    )
    for n in range(24):
        Image.open(root / "astronaut.png").crop((n, n, 200 + n, 200 + n)).save(root / f"c{n}.png")
    return [str(root / f"c{n}.png") for n in range(24)]


def test_jobs_can_be_cancelled_and_a_repeated_request_gets_the_queued_job(
    data_dir, root, slow_crops
):
    body = {"sources": slow_crops}
    pruning = {**body, "prune": True}
    with _client(allowed_roots=[root], batch_size=4) as client:
        running = client.post("/api/v1/collections/a/index", json=body).json()
        waiting = client.post("/api/v1/collections/a/index", json=pruning).json()  # behind it
        again = client.post("/api/v1/collections/a/index", json=pruning).json()  # a retry
        assert again["job_id"] == waiting["job_id"] != running["job_id"]
        other = client.post("/api/v1/collections/a/index", json=body).json()
        assert other["job_id"] not in (waiting["job_id"], running["job_id"])  # its own job
        client.delete(f"/api/v1/jobs/{other['job_id']}")
        dropped = client.delete(f"/api/v1/jobs/{waiting['job_id']}").json()
        assert dropped["status"] == "cancelled" and dropped["progress"] is None
        while not (client.get(running["url"]).json()["progress"] or {}).get("done"):
            time.sleep(0.05)  # a batch stored (its progress is there from the start)
        client.delete(f"/api/v1/jobs/{running['job_id']}")
        while (job := client.get(running["url"]).json())["status"] == "running":
            time.sleep(0.05)
        assert job["status"] == "cancelled" and "cancelled by a request" in job["error"]["error"]
        assert job["resume"].startswith("send the same request again")
        stored = {c["name"]: c["count"] for c in client.get("/api/v1/collections").json()}
        assert 0 < stored["a"] < 24  # what it stored stays
        done = _job(client, client.post("/api/v1/collections/a/index", json=body))
        assert done["status"] == "done" and done["stats"]["skipped"] == stored["a"]
        assert client.delete("/api/v1/jobs/nope").status_code == 404


def test_index_jobs_of_two_collections_run_side_by_side_and_store_everything(
    data_dir, root, slow_crops
):
    sources = slow_crops
    with _client(allowed_roots=[root], batch_size=2) as client:  # a: 12 batches of 0.3 s
        started = [
            client.post(f"/api/v1/collections/{name}/index", json={"sources": part}).json()
            for name, part in (("a", sources), ("b", sources[:12]))
        ]
        jobs = [client.app.state.imgembed.jobs.get(s["job_id"]) for s in started]
        deadline = time.monotonic() + 60
        while not all(job.progress and job.progress.done for job in jobs):  # both under way
            assert jobs[0].finished is None, "b waited for a"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        running = client.get("/api/v1/jobs", params={"status": "running"}).json()["jobs"]
        metrics = client.get("/metrics").text
        if all(job.status == "running" for job in jobs):  # still: listed, and counted
            assert {j["job_id"] for j in running} == {s["job_id"] for s in started}
            assert 'imgembed_jobs{status="running"} 2.0' in metrics
        while not all(job.finished for job in jobs):
            assert time.monotonic() < deadline + 60
            time.sleep(0.05)
        done = [client.get(s["url"]).json() for s in started]
        counts = {c["name"]: c["count"] for c in client.get("/api/v1/collections").json()}
        listed = client.get("/api/v1/jobs").json()["jobs"]
        assert [j["job_id"] for j in listed] == [s["job_id"] for s in reversed(started)]
        assert listed[0] == done[1]  # newest first, as GET of each shows it
        assert client.get("/api/v1/jobs?status=queued").json() == {"jobs": []}
        assert client.get("/api/v1/jobs?status=lost").status_code == 422
        assert 'imgembed_jobs{status="running"} 0.0' in client.get("/metrics").text
    assert [(job["status"], job["stats"]["successful"]) for job in done] == [
        ("done", 24),
        ("done", 12),
    ]
    assert counts == {"a": 24, "b": 12}


def test_jobs_of_one_target_run_in_order_and_of_others_side_by_side():
    """A long job (a backfill) holds back later jobs for its own collection or store only:
    another target's job runs meanwhile, up to WORKERS targets at once."""
    from imgembed.api.jobs import WORKERS, Jobs

    assert WORKERS == 2
    ran: list[str] = []
    gates = {name: threading.Event() for name in ("long", "next", "other", "third")}

    def job(name):
        def run(progress):
            ran.append(name)
            assert gates[name].wait(60)
            return None

        return run

    def wait_for(condition):
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    jobs = Jobs()
    long = jobs.submit("catalog-embed", "shop", 100, job("long"))
    after = jobs.submit("catalog-embed", "shop", 1, job("next"))
    other = jobs.submit("catalog-embed", "small", 1, job("other"))
    third = jobs.submit("index", "shop", 1, job("third"))  # a collection named like the store
    wait_for(lambda: {"long", "other"} <= set(ran))  # two targets at once
    assert (long.status, other.status) == ("running", "running")
    assert (after.status, third.status) == ("queued", "queued")
    gates["other"].set()
    wait_for(lambda: "third" in ran)  # the free worker takes the next target
    assert other.status == "done" and after.status == "queued"
    gates["third"].set()
    gates["long"].set()
    wait_for(lambda: after.status == "running")
    gates["next"].set()
    wait_for(lambda: after.finished is not None)
    jobs.close()
    assert ran == ["long", "other", "third", "next"] or ran == ["other", "long", "third", "next"]
    assert [j.status for j in (long, after, other, third)] == ["done"] * 4


def test_the_oldest_finished_jobs_are_forgotten_also_behind_a_long_one(monkeypatch):
    from imgembed.api import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "KEEP", 3)
    gate = threading.Event()
    jobs = jobs_module.Jobs()
    long = jobs.submit("index", "long", 1, lambda progress: gate.wait(60))
    quick = [jobs.submit("index", f"t{n}", 1, lambda progress: None) for n in range(10)]
    deadline = time.monotonic() + 60
    while not all(job.finished for job in quick):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    last = jobs.submit("index", "last", 1, lambda progress: None)  # forgets on a submit
    kept = [job.id for job in jobs.listing()]
    assert kept == [last.id, quick[9].id, quick[8].id, quick[7].id, long.id]
    gate.set()
    jobs.close()


def test_a_running_job_shows_its_progress_before_its_first_batch():
    from imgembed.api.jobs import Jobs

    gate = threading.Event()
    jobs = Jobs()
    job = jobs.submit("index", "a", 5, lambda progress: gate.wait(60))
    _until(lambda: job.status == "running")
    # was "progress": null for a running job until its first batch came back
    assert job.to_dict()["progress"] == {"total": 5, "done": 0, "embedded": 0, "cached": 0,
                                         "failed": 0, "skipped": 0, "waiting": ""}  # fmt: skip
    gate.set()
    jobs.close()


def test_a_shutdown_says_which_queued_jobs_it_dropped(caplog):
    from imgembed.api.jobs import Jobs

    gate = threading.Event()

    def long(progress):
        assert gate.wait(60)

    jobs = Jobs()
    running = jobs.submit("index", "a", 1, long, "again")
    waiting = jobs.submit("index", "a", 1, lambda progress: None, "send it again")
    deadline = time.monotonic() + 60
    while running.status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    closing = threading.Thread(target=jobs.close)
    closing.start()
    while waiting.status == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gate.set()
    closing.join(60)
    assert not closing.is_alive() and running.status == "done"
    assert waiting.status == "cancelled" and "shut down before it started" in waiting.error["error"]
    assert waiting.to_dict()["resume"] == "send it again"
    said = [r.getMessage() for r in caplog.records if r.name == "imgembed.api"]
    assert (
        f"index job {waiting.id} for 'a' dropped at shutdown before it started; to go on: "
        "send it again" in said
    ), said


def _until(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)


def test_the_jobs_of_two_worker_processes_are_one_list(tmp_path):
    """`serve --workers 2`: a request reaches either process. Each sees the other's jobs
    (status, progress, listing), a DELETE through either stops the job, and one
    collection's jobs still run one at a time, in order (before: 404 from the other
    process, a cancel that missed, and 409 for a second job of the same collection)."""
    from imgembed.api.board import Board
    from imgembed.api.jobs import Jobs
    from imgembed.engine.pipeline import Progress

    path = tmp_path / "jobs.sqlite3"
    first, second = Jobs(board=Board(path)), Jobs(board=Board(path))  # one per process

    def long(progress):
        while True:  # until its progress callback raises: cancelled
            progress(Progress(10, 1))
            time.sleep(0.05)

    running = first.submit("index", "shop", 10, long, "send it again")
    _until(lambda: (second.status(running.id)["progress"] or {}).get("done") == 1)
    assert second.status(running.id)["status"] == "running"
    after = second.submit("index", "shop", 1, lambda progress: None, "again")
    other = second.submit("index", "other", 1, lambda progress: None, "again")
    _until(lambda: second.status(other.id)["status"] == "done")  # another collection: at once
    assert second.status(after.id)["status"] == "queued"  # behind the first process's job
    assert [job["job_id"] for job in first.shown()] == [other.id, after.id, running.id]

    assert second.cancel(running.id)["job_id"] == running.id  # asked through the other
    # on the board: the owner's status changes a moment before it writes it there
    _until(lambda: second.status(running.id)["status"] == "cancelled")
    stopped = second.status(running.id)
    assert "cancelled by a request" in stopped["error"]["error"]
    assert stopped["resume"] == "send it again"
    _until(lambda: first.status(after.id)["status"] == "done")

    # a queued job of one process, cancelled through the other: at once, and never run
    gate, ran = threading.Event(), []
    blocking = first.submit("index", "x", 1, lambda progress: gate.wait(60) and None)
    queued = first.submit("index", "x", 1, lambda progress: ran.append(1))
    assert second.cancel(queued.id)["status"] == "cancelled"
    assert first.status(queued.id)["status"] == "cancelled"
    gate.set()
    _until(lambda: first.get(queued.id).status == "cancelled")
    assert first.status(blocking.id)["status"] == "done" and not ran
    first.close()
    second.close()

    # a job whose process has gone (a restart, a crash): cancelled, with how to go on
    with contextlib.closing(Board(path, owner="999999999:1.000:gone")) as gone:
        gone.publish({**running.to_dict(), "job_id": "lost", "status": "running",
                      "finished": None}, "send it again")  # fmt: skip
    with contextlib.closing(Board(path)) as later:
        shown = later.get("lost")
    assert shown["status"] == "cancelled" and shown["resume"] == "send it again"
    assert "server process that ran it stopped" in shown["error"]["error"]


def test_a_board_locked_as_the_workers_open_it_together_is_opened(tmp_path, monkeypatch):
    """Two workers starting at once: one got "database is locked" at once and shared no jobs
    (its answers for the other's jobs were 404)."""
    from imgembed.api import board as board_module

    prepare, calls = board_module.Board._prepare, []

    def locked_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        prepare(self)

    monkeypatch.setattr(board_module.Board, "_prepare", locked_once)
    opened = board_module.open_board(tmp_path)
    assert opened is not None and len(calls) == 2
    opened.close()


def test_a_board_that_cannot_be_used_is_given_up_at_once(tmp_path, monkeypatch):
    """Only a lock held by another worker is waited for: a board the disk refuses (here its
    WAL file's name taken by a folder: 'disk I/O error') was tried again for 10 s, and each
    worker's start waited that long before jobs went on unshared."""
    from imgembed.api import board as board_module

    (tmp_path / "jobs.sqlite3-wal").mkdir()
    (tmp_path / "jobs.sqlite3-shm").mkdir()
    prepare, calls = board_module.Board._prepare, []

    def counted(self):
        calls.append(1)
        prepare(self)

    monkeypatch.setattr(board_module.Board, "_prepare", counted)
    assert board_module.open_board(tmp_path) is None
    assert len(calls) == 1


def test_a_delete_as_the_job_ends_does_not_leave_it_running_on_the_board(tmp_path):
    """A DELETE's write of the job ("running", as it was read) landed after the job thread's
    "done": the board showed it running for good, and the other worker process held every
    later job of the collection behind it until a restart."""
    from imgembed.api.board import Board
    from imgembed.api.jobs import Jobs

    class SlowBoard(Board):  # the request thread descheduled between its read and its write
        def publish(self, job, resume, key=""):
            if threading.current_thread().name == "delete" and job["status"] == "running":
                time.sleep(0.5)
            super().publish(job, resume, key)

    path = tmp_path / "jobs.sqlite3"
    first, second = Jobs(board=SlowBoard(path)), Jobs(board=Board(path))
    gate = threading.Event()
    job = first.submit("index", "shop", 1, lambda progress: gate.wait(30) and None)
    _until(lambda: job.status == "running")
    delete = threading.Thread(target=first.cancel, args=(job.id,), name="delete")
    delete.start()
    time.sleep(0.1)
    gate.set()
    delete.join()
    _until(lambda: job.finished is not None)
    _until(lambda: second.status(job.id)["status"] == job.status, 5)
    later = second.submit("index", "shop", 1, lambda progress: None)
    _until(lambda: second.status(later.id)["status"] == "done", 10)
    first.close()
    second.close()


@pytest.mark.parametrize("moment", ["as it is taken", "just after it is taken"])
def test_a_delete_through_another_process_as_the_job_starts_runs_no_batch(tmp_path, moment):
    """Both processes read the job queued: the other's DELETE answered "cancelled before it
    started" while its owner took it, which ran its first batch all the same (stored, then
    "cancelled after 1 of 3 items"), and the board showed it ended while it ran."""
    from imgembed.api.board import Board
    from imgembed.api.jobs import Jobs
    from imgembed.engine.pipeline import Progress

    path = tmp_path / "jobs.sqlite3"
    second, answers = Jobs(board=Board(path)), []

    class Taking(Board):  # the DELETE through the other process lands at `moment`
        def take(self, job, resume, key=""):
            if moment == "as it is taken":
                answers.append(second.cancel(job["job_id"]))
            return super().take(job, resume, key)

        def publish(self, job, resume, key=""):
            if job["status"] == "running" and not answers:
                answers.append(second.cancel(job["job_id"]))
            super().publish(job, resume, key)

    first, ran = Jobs(board=Taking(path)), []

    def batches(progress):
        for done in (1, 2, 3):
            ran.append(done)
            progress(Progress(3, done, embedded=done))

    job = first.submit("index", "shop", 3, batches, "send it again")
    _until(lambda: first.get(job.id).finished is not None)
    final = second.status(job.id)
    assert ran == [] and final["status"] == "cancelled" and final["resume"] == "send it again"
    said = {
        "as it is taken": ("cancelled", "cancelled before it started"),
        "just after it is taken": ("running", "cancelled by a request (DELETE of the job)"),
    }
    assert answers[0]["status"] == said[moment][0]  # the DELETE's answer, as it was
    assert final["error"]["error"] == said[moment][1]
    first.close()
    second.close()


def test_the_same_request_after_a_delete_through_another_process_is_a_new_job(tmp_path):
    """A queued job cancelled through the other worker process stayed "queued" in its own
    until its turn: the same request again got that cancelled job back (202), never run."""
    from imgembed.api.board import Board
    from imgembed.api.jobs import Jobs

    path = tmp_path / "jobs.sqlite3"
    first, second = Jobs(board=Board(path)), Jobs(board=Board(path))
    gate, ran = threading.Event(), []
    first.submit("index", "x", 1, lambda progress: gate.wait(30) and None)
    queued = first.submit("index", "x", 1, lambda progress: ran.append(1), key="k")
    assert second.cancel(queued.id)["status"] == "cancelled"
    again = first.submit("index", "x", 1, lambda progress: ran.append(2), key="k")
    assert again is not queued and first.status(again.id)["status"] == "queued"
    assert queued.status == "cancelled"
    gate.set()
    _until(lambda: first.status(again.id)["status"] == "done")
    assert ran == [2]
    first.close()
    second.close()


def test_the_same_request_through_the_other_process_gets_the_queued_job(tmp_path):
    """A client's retry that reached the other worker process queued the work a second time."""
    from imgembed.api import board as board_module
    from imgembed.api.board import Board
    from imgembed.api.jobs import Jobs

    path = tmp_path / "jobs.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as earlier:  # a board without keys
        earlier.execute(board_module._SCHEMA)
        earlier.execute("ALTER TABLE jobs DROP COLUMN key")
    first, second = Jobs(board=Board(path)), Jobs(board=Board(path))
    gate, ran = threading.Event(), []
    first.submit("index", "x", 1, lambda progress: gate.wait(30) and None)
    queued = first.submit("index", "x", 1, lambda progress: ran.append(1), key="k")
    again = second.submit("index", "x", 1, lambda progress: ran.append(2), key="k")
    assert (again.id, again.status) == (queued.id, "queued")
    other = second.submit("index", "x", 1, lambda progress: ran.append(3), key="other")
    assert other.id != queued.id  # another request is another job
    gate.set()
    _until(lambda: second.status(other.id)["status"] == "done")
    _until(lambda: second.status(queued.id)["status"] == "done")
    assert sorted(ran) == [1, 3]
    first.close()
    second.close()


def test_the_same_request_reaching_both_processes_at_once_is_one_job(tmp_path):
    """Two equal requests at the same moment, one in each worker process: each looked for
    the other's queued job before either had written its own, and the work was queued (and
    run) twice: a forced embed of a whole store, two times."""
    from imgembed.api.board import Board
    from imgembed.api.jobs import Jobs

    together = threading.Barrier(2)

    class Together(Board):  # both equal requests arrive before either has queued its job
        def enqueue(self, job, resume, key=""):  # the lookup, and the job's write
            if key == "k":
                together.wait(30)
            return super().enqueue(job, resume, key)

    path = tmp_path / "jobs.sqlite3"
    first, second = Jobs(board=Together(path)), Jobs(board=Together(path))
    gate, ran = threading.Event(), []
    for jobs in (first, second):  # each busy with the collection: the equal ones queue
        jobs.submit("index", "x", 1, lambda progress: gate.wait(30) and None)
    answers = []
    threads = [
        threading.Thread(target=lambda jobs=jobs, n=n: answers.append(
            jobs.submit("index", "x", 1, lambda progress, n=n: ran.append(n), key="k")))
        for n, jobs in enumerate((first, second))
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({answer.id for answer in answers}) == 1
    gate.set()
    _until(lambda: first.status(answers[0].id)["status"] == "done")
    _until(lambda: not first.active("index", "x"))
    assert len(ran) == 1
    first.close()
    second.close()


def test_two_processes_whose_workers_wait_for_each_other_go_on(tmp_path):
    """Each process's two job workers waited (holding the worker) for an older job of the
    same collection that the other process had queued behind its own two waiting workers:
    every job of the server stayed queued until a restart."""
    from imgembed.api.board import Board
    from imgembed.api.jobs import Jobs

    path = tmp_path / "jobs.sqlite3"
    first, second = Jobs(board=Board(path)), Jobs(board=Board(path))
    gate = threading.Event()
    busy = [
        jobs.submit("index", target, 1, lambda progress: gate.wait(30) and None)
        for jobs, target in ((first, "x"), (first, "z"), (second, "y"), (second, "w"))
    ]
    _until(lambda: all(job.status == "running" for job in busy))
    order = [(second, "x"), (first, "y"), (first, "x"), (second, "y"),
             (second, "z"), (first, "w"), (first, "z"), (second, "w")]  # fmt: skip
    short = []
    for jobs, target in order:  # created in this order: each waits for the one before
        short.append(jobs.submit("index", target, 1, lambda progress: None))
        time.sleep(0.01)
    gate.set()
    _until(lambda: all(job.status == "done" for job in short), 20)
    first.close()
    second.close()


def test_a_live_worker_stays_alive_when_the_system_clock_is_set(monkeypatch):
    """psutil's create_time is the boot time plus the ticks since: it moved with the clock
    (NTP's step, a VM's resume), and every job of the live workers showed "cancelled"."""
    import psutil

    from imgembed.api import board

    me = board.this_process()
    assert board.alive(me)
    boot_time = psutil.boot_time()
    monkeypatch.setattr(psutil, "boot_time", lambda: boot_time + 1.0)
    if hasattr(psutil, "_pslinux"):
        monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: boot_time + 1.0)
    assert board.alive(me)
    assert not board.alive("999999999:1.000:gone")


def test_jobs_waiting_are_bounded_then_503(monkeypatch):
    """300 index requests were all queued, each holding its item list: memory without end."""
    from imgembed.api import jobs as jobs_module
    from imgembed.errors import OverloadedError

    monkeypatch.setattr(jobs_module, "QUEUED", 3)
    gate = threading.Event()
    jobs = jobs_module.Jobs()
    first = jobs.submit("index", "a", 1, lambda progress: gate.wait(60) and None)
    _until(lambda: first.status == "running")  # not queued itself: its worker has started
    waiting = [jobs.submit("index", "a", 1, lambda progress: None, key=f"k{n}") for n in range(3)]
    assert jobs.submit("index", "a", 1, lambda progress: None, key="k0") is waiting[0]  # the same
    with pytest.raises(OverloadedError, match="3 jobs are waiting already") as caught:
        jobs.submit("index", "b", 1, lambda progress: None)
    assert caught.value.retry_after == jobs_module.QUEUE_RETRY_SECONDS
    gate.set()
    _until(lambda: all(job.status == "done" for job in waiting))
    assert jobs.submit("index", "b", 1, lambda progress: None).status in (
        "queued",
        "running",
        "done",
    )
    jobs.close()


def test_a_failed_job_says_how_to_resume_only_when_a_rerun_can_help():
    from imgembed.api.jobs import Jobs
    from imgembed.errors import ConfigurationError, StoreUnavailableError

    def failing(error):
        def run(progress):
            raise error

        return run

    jobs = Jobs()
    down = jobs.submit("index", "a", 1, failing(StoreUnavailableError("db down")), "again")
    wrong = jobs.submit("index", "b", 1, failing(ConfigurationError("bad")), "again")
    for _ in range(600):
        if down.finished and wrong.finished:
            break
        time.sleep(0.05)
    jobs.close()
    assert (down.status, down.to_dict()["resume"]) == ("failed", "again")
    assert (wrong.status, wrong.to_dict()["resume"]) == ("failed", None)


def test_shutdown_stops_an_index_job_at_a_stored_batch_and_a_rerun_resumes(
    data_dir, root, slow_crops, caplog
):
    body = {"sources": slow_crops}
    with _client(allowed_roots=[root], batch_size=4) as client:
        app = client.app
        started = client.post("/api/v1/collections/crops/index", json=body).json()
        job = app.state.imgembed.jobs.get(started["job_id"])
        while job.progress is None or job.progress.done == 0:
            time.sleep(0.05)
    assert job.status == "cancelled" and "shutting down" in job.error["error"]
    assert job.to_dict()["resume"].startswith("send the same request again")
    said = [r.getMessage() for r in caplog.records if r.name == "imgembed.api"]
    assert any(f"index job {job.id} for 'crops' cancelled after" in m and "of 24 items" in m
               and "same request again" in m for m in said), said  # fmt: skip
    with _client(allowed_roots=[root], batch_size=4) as client:
        stored = client.get("/api/v1/collections").json()[0]["count"]
        assert 0 < stored < 24
        again = _job(client, client.post("/api/v1/collections/crops/index", json=body))
        assert again["stats"]["skipped"] == stored
        assert again["stats"]["successful"] == 24 - stored


def test_a_url_that_cannot_be_fetched_is_not_retried_by_the_openai_sdk(root):
    from openai import InternalServerError, OpenAI

    files = FileServer({})
    sent: list[str] = []
    try:
        with _client(allowed_roots=[root], allow_private_urls=True, retry_delay=0.01) as client:
            client.event_hooks["request"] = [lambda request: sent.append(request.url.path)]
            sdk = OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
            with pytest.raises(InternalServerError, match="server answered 404"):
                sdk.embeddings.create(model="imgembed-tiny", input=files.url("gone.jpg"))
            # the server has retried what can be retried: the SDK sent it once, not 3 times
            assert sent == ["/v1/embeddings"]
            answer = client.post(IMAGE, json={"image_url": files.url("gone.jpg")})
            assert answer.status_code == 502 and answer.headers["x-should-retry"] == "false"
    finally:
        files.close()
