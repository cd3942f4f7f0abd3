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
