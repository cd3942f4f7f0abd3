"""Dynamic batching and faults through real HTTP (uvicorn on loopback, in this process so the
encoder can be replaced by the fake one): concurrent requests share encoder batches and get
the library's vectors; a poisoned image, a failing encoder and a dying worker fail only
their own requests, at once, with a clear body; a full queue answers 503 + Retry-After."""

import asyncio
import base64
import threading
import time

import httpx
import numpy as np
import pytest

import imgembed.service
from imgembed import ImageEmbeddingService
from imgembed.api import create_app
from imgembed.config import load_settings
from tests.conftest import TINY
from tests.fakes import FakeEncoder, solid_png, until
from tests.serving import serve_in_thread

IMAGE = "/api/v1/embeddings/image"


@pytest.fixture
def fake(monkeypatch):
    """The service's encoder, wrapped by the fake (created when the app loads its model)."""
    made: list[FakeEncoder] = []
    real = imgembed.service.create_encoder

    def create(ref, settings):
        made.append(FakeEncoder(real(ref, settings), delay=0.05))
        return made[-1]

    monkeypatch.setattr(imgembed.service, "create_encoder", create)
    return made


@pytest.fixture
def reference(photos):
    with ImageEmbeddingService(**TINY, cache_embeddings=False) as library:
        return {str(p): library.embed_image(p) for p in photos}


def _server(photos, **settings):
    roots = [photos[0].parent]
    settings = load_settings(**TINY, cache_embeddings=False, allowed_roots=roots, **settings)
    return serve_in_thread(create_app(settings))


def _cos(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


async def _post_all(base, bodies, timeout=60):
    async with httpx.AsyncClient(base_url=base, timeout=timeout) as client:

        async def post(body):
            started = time.perf_counter()
            response = await client.post(IMAGE, json=body)
            return response, time.perf_counter() - started

        return await asyncio.gather(*(post(body) for body in bodies))


def _queued(base) -> float:
    """Inputs prepared and waiting for the encoder, as /metrics reports them."""
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("imgembed_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("/metrics has no imgembed_queue_depth")


async def test_concurrent_requests_share_batches_and_a_poisoned_one_fails_alone(
    fake, photos, reference
):
    poison = {"image_base64": base64.b64encode(solid_png()).decode()}
    paths = [str(p) for p in photos] * 4
    bodies = [{"image_path": p} for p in paths]
    bodies.insert(len(bodies) // 2, poison)
    with _server(photos) as base:
        encoder = fake[-1]  # the app's (the reference library may have made one too)
        encoder.image_batches.clear()
        # The first request holds the encoder; the rest (poison among them) queue behind it
        # and must then go in together, whatever the machine's timing.
        encoder.gate = threading.Event()
        first = asyncio.create_task(_post_all(base, bodies[:1]))
        await until(lambda: encoder.image_batches, "the first batch")
        rest = asyncio.create_task(_post_all(base, bodies[1:]))
        await until(lambda: _queued(base) == len(bodies) - 1, "the queue to fill")
        encoder.gate.set()
        answers = await first + await rest
        metrics = httpx.get(f"{base}/metrics").text
    assert encoder.image_batches[:2] == [1, len(bodies) - 1]
    assert encoder.failed_batches[0] == len(bodies) - 1  # the poison shared a batch
    assert sum(encoder.image_batches) >= len(paths) + 1  # the poisoned batch was retried
    assert len(encoder.image_batches) < len(bodies)  # fewer encoder calls than requests
    for body, (response, _) in zip(bodies, answers, strict=True):
        if body is poison:
            assert response.status_code == 503, response.text
            assert response.json()["error_type"] == "EncodeError"
            assert "refused" in response.json()["error"]
        else:
            assert response.status_code == 200, response.text
            assert _cos(response.json()["embedding"], reference[body["image_path"]]) >= 0.99999
    assert 'imgembed_batch_size_bucket{kind="image",le="1.0"}' in metrics


async def test_an_encoder_failure_fails_those_requests_at_once_then_recovers(fake, photos):
    bodies = [{"image_path": str(p)} for p in photos]
    with _server(photos) as base:
        encoder = fake[-1]  # the app's (the reference library may have made one too)
        encoder.fail = True
        answers = await _post_all(base, bodies)
        for response, seconds in answers:
            assert response.status_code == 503, response.text
            body = response.json()
            assert body["error_type"] == "EncodeError" and "refused a batch" in body["error"]
            assert response.headers["retry-after"] == "1" and body["request_id"]
            assert seconds < 10  # a clear answer, not a hang until the client's timeout
        encoder.fail = False
        ((after, _),) = await _post_all(base, bodies[:1])
        assert after.status_code == 200


async def test_a_dying_worker_fails_every_waiter_and_the_next_request_works(fake, photos):
    bodies = [{"image_path": str(p)} for p in photos * 2]
    with _server(photos) as base:
        encoder = fake[-1]  # the app's (the reference library may have made one too)
        encoder.die, encoder.gate = True, threading.Event()
        running = asyncio.create_task(_post_all(base, bodies))
        while not encoder.image_batches:  # the first batch is in the encoder
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the others are queued behind it
        released = time.perf_counter()
        encoder.gate.set()
        answers = await running
        assert time.perf_counter() - released < 10  # no hang until the client's timeout
        for response, _ in answers:
            assert response.status_code == 503
            assert "worker died" in response.json()["error"]
        encoder.die = False
        ((after, _),) = await _post_all(base, bodies[:1])
        assert after.status_code == 200


async def test_a_full_queue_answers_503_with_retry_after(fake, photos):
    bodies = [{"image_path": str(p)} for p in photos] * 2
    with _server(photos, queue_size=2, max_batch_inputs=2) as base:
        encoder = fake[-1]  # the app's (the reference library may have made one too)
        encoder.delay = 0.5
        answers = await _post_all(base, bodies)
        statuses = [response.status_code for response, _ in answers]
        refused = [response for response, _ in answers if response.status_code == 503]
        assert statuses.count(200) >= 2 and refused, statuses
        assert set(statuses) == {200, 503}
        for response in refused:
            assert response.json()["error_type"] == "OverloadedError"
            assert int(response.headers["retry-after"]) >= 1
        ((after, _),) = await _post_all(base, bodies[:1])
        assert after.status_code == 200
