"""The dynamic batcher without HTTP: concurrent requests share encoder batches and get the
library's own vectors; a bad input, a poisoned item, a failing encoder and a dying worker
fail only what they must, at once; the queue is bounded; the event loop keeps running."""

import asyncio
import threading
import time

import numpy as np
import pytest

from imgembed import EncodeError, ImageEmbeddingService, ImageNotFoundError, InvalidImageError
from imgembed.engine.batcher import Batcher
from imgembed.engine.pipeline import ImagePipeline
from imgembed.errors import OverloadedError, RequestTooLargeError, UnavailableError
from tests.conftest import TINY
from tests.fakes import FakeEncoder, solid_png, until


@pytest.fixture
def service():
    with ImageEmbeddingService(**TINY, cache_embeddings=False) as service:
        yield service


def _batcher(service, delay=0.0, **options):
    fake = FakeEncoder(service.encoder, delay)
    pipeline = ImagePipeline(fake, service.settings, None, service.intake)
    return fake, Batcher(pipeline, **options)


def _cosines(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.sum(a * b, axis=-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


async def _behind_a_held_batch(fake, batcher, sources):
    """Results for `sources`, queued while the encoder holds a first batch: they go in
    together, however busy the machine (a timing-free way to make batches share)."""
    fake.gate = threading.Event()
    first = asyncio.create_task(batcher.embed_image(sources[0]))
    await until(lambda: fake.image_batches, "the first batch")
    rest = asyncio.gather(*(batcher.embed_image(s) for s in sources[1:]))
    await until(lambda: batcher.queue_depth == len(sources) - 1, "the queue to fill")
    fake.gate.set()
    return [await first, *await rest]


async def test_concurrent_requests_share_batches_and_equal_the_library(service, photos):
    expected = {str(r.image_path): r.embedding for r in service.embed_images(photos)}
    fake, batcher = _batcher(service, delay=0.05)
    sources = [str(p) for p in photos] * 4
    results = await asyncio.gather(*(batcher.embed_image(s) for s in sources))
    assert sum(fake.image_batches) == len(sources)
    assert len(fake.image_batches) < len(sources)
    fake.image_batches.clear()
    held = await _behind_a_held_batch(fake, batcher, sources)
    await batcher.close()
    assert fake.image_batches == [1, len(sources) - 1]
    for source, result in zip(sources * 2, results + held, strict=True):
        assert result.ok and result.image_path == source
        assert _cosines(result.embedding, expected[source]) >= 0.99999


async def test_a_poisoned_item_fails_only_its_own_request(service, photos):
    expected = {str(r.image_path): r.embedding for r in service.embed_images(photos)}
    fake, batcher = _batcher(service)
    sources = [*map(str, photos), solid_png(), *map(str, photos)]
    results = await _behind_a_held_batch(fake, batcher, sources)
    await batcher.close()
    assert fake.failed_batches[0] == len(sources) - 1  # the poison shared a batch
    for source, result in zip(sources, results, strict=True):
        if isinstance(source, bytes):
            assert isinstance(result.error, EncodeError) and "refused" in str(result.error)
        else:
            assert result.ok and _cosines(result.embedding, expected[source]) >= 0.99999


async def test_unreadable_inputs_fail_alone(service, photos, tmp_path):
    _, batcher = _batcher(service)
    sources = [str(photos[0]), str(tmp_path / "missing.jpg"), b"not an image", str(photos[1])]
    results = await batcher.embed_images(sources)
    await batcher.close()
    assert [r.ok for r in results] == [True, False, False, True]
    assert isinstance(results[1].error, ImageNotFoundError)
    assert isinstance(results[2].error, InvalidImageError)


async def test_a_failing_encoder_fails_its_requests_at_once_then_recovers(service, photos):
    fake, batcher = _batcher(service)
    fake.fail = True
    started = time.perf_counter()
    failed = await asyncio.gather(*(batcher.embed_image(str(p)) for p in photos))
    assert time.perf_counter() - started < 5  # generous on a busy machine; no hang
    assert all(isinstance(r.error, EncodeError) for r in failed)
    assert all("refused" in str(r.error) for r in failed)
    fake.fail = False
    assert (await batcher.embed_image(str(photos[0]))).ok
    await batcher.close()


async def test_a_dying_worker_fails_every_waiter_and_the_next_request_works(service, photos):
    fake, batcher = _batcher(service, max_batch=2)
    fake.die, fake.gate = True, threading.Event()
    sources = [str(p) for p in photos * 2]
    running = asyncio.gather(*(batcher.embed_image(s) for s in sources))
    while not fake.image_batches or batcher.queue_depth < len(sources) - fake.image_batches[0]:
        await asyncio.sleep(0.01)  # the first batch is in the encoder, the rest wait
    started = time.perf_counter()
    fake.gate.set()  # now the worker dies
    results = await running
    assert time.perf_counter() - started < 5  # every waiter failed at once, not after a hang
    assert len(fake.image_batches) == 1  # not one batch after another
    assert all(isinstance(r.error, EncodeError) for r in results)
    assert all("worker died" in str(r.error) for r in results)
    fake.die = False
    assert (await batcher.embed_image(str(photos[0]))).ok
    assert batcher.in_flight == 0
    await batcher.close()


async def test_the_queue_is_bounded(service, photos):
    _, batcher = _batcher(service, delay=0.3, max_queue=4)
    running = [asyncio.create_task(batcher.embed_image(str(p))) for p in photos[:4]]
    await asyncio.sleep(0)  # admitted
    assert batcher.in_flight == 4
    with pytest.raises(OverloadedError) as refused:
        await batcher.embed_images([str(photos[4])])
    assert refused.value.retry_after > 0 and "IMGEMBED_QUEUE_SIZE" in str(refused.value)
    assert all(r.ok for r in await asyncio.gather(*running))
    assert (await batcher.embed_image(str(photos[4]))).ok  # room again
    # more than the queue holds at all: no retry would admit it, so no 503 but a 413
    with pytest.raises(RequestTooLargeError, match="5 inputs at once, more than the 4"):
        await batcher.embed_images([str(p) for p in photos[:5]])
    with pytest.raises(RequestTooLargeError):
        await batcher.embed_texts(["a"] * 5)
    assert batcher.in_flight == 0
    await batcher.close()
    with pytest.raises(UnavailableError, match="shutting down"):
        await batcher.embed_image(str(photos[0]))


async def test_texts_are_batched_and_a_bad_text_fails_alone(service):
    texts = [f"a photo of {n} apples" for n in range(12)]
    expected = service.embed_texts(texts)
    fake, batcher = _batcher(service, delay=0.05)
    vectors = await asyncio.gather(*(batcher.embed_texts([t]) for t in texts))
    assert len(fake.text_batches) < len(texts) and sum(fake.text_batches) == len(texts)
    assert min(_cosines(np.concatenate(vectors), expected)) >= 0.99999
    outcomes = await asyncio.gather(
        *(batcher.embed_texts([t]) for t in ["poison", *texts[:5]]), return_exceptions=True
    )
    assert isinstance(outcomes[0], EncodeError) and "refused" in str(outcomes[0])
    assert all(isinstance(v, np.ndarray) and v.shape == (1, 64) for v in outcomes[1:])
    await batcher.close()


async def test_the_event_loop_keeps_running(service, photos):
    _, batcher = _batcher(service, delay=0.02)
    ticks, done = 0, asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    await asyncio.gather(*(batcher.embed_image(str(p)) for p in photos * 4))
    elapsed = time.perf_counter() - started
    done.set()
    await task
    await batcher.close()
    assert elapsed > 0.1
    assert ticks >= elapsed / 0.005 * 0.3


async def test_labels_extended_metadata_and_normalisation(service, photos):
    _, batcher = _batcher(service)
    data = photos[0].read_bytes()
    (named,) = await batcher.embed_images([data], labels=["upload.png"], extended=True)
    assert named.image_path == "upload.png" and named.ok
    assert {"camera_info", "gps_info", "creation_date"} <= named.metadata.keys()
    assert named.metadata["width"] > 0 and named.normalized
    raw = await batcher.embed_image(data, normalize=False)
    assert raw.normalized is False and abs(np.linalg.norm(raw.embedding) - 1) > 1e-3
    assert _cosines(raw.embedding, named.embedding) >= 0.99999
    (missing,) = await batcher.embed_images(["/no/such.jpg"], extended=True)
    assert isinstance(missing.error, ImageNotFoundError)
    await batcher.close()
