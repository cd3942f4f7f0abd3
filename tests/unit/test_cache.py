"""The persistent embedding cache: hits, keys, clearing, many processes at once."""

import multiprocessing

import numpy as np

from imgembed import ImageEmbeddingService
from tests.conftest import TINY


def _vectors(results):
    return np.stack([r.embedding for r in results])


def test_second_run_is_served_from_cache(tiny_service, photos):
    first = tiny_service.embed_images(photos)
    assert not any(r.cached for r in first)
    second = tiny_service.embed_images(photos)
    assert all(r.cached for r in second)
    np.testing.assert_array_equal(_vectors(first), _vectors(second))
    assert [r.image_id for r in first] == [r.image_id for r in second]
    assert second[0].metadata["width"] == first[0].metadata["width"]


def test_cache_persists_across_services_and_is_keyed_by_content(photos, tmp_path):
    with ImageEmbeddingService(**TINY) as service:
        service.embed_images(photos[:2])
    copy = tmp_path / "renamed.bin"
    copy.write_bytes(photos[0].read_bytes())
    with ImageEmbeddingService(**TINY) as service:
        results = service.embed_images([photos[0], copy, photos[2]])
    assert [r.cached for r in results] == [True, True, False]


def test_a_cached_image_is_refused_by_limits_as_an_uncached_one(photos):
    with ImageEmbeddingService(**TINY) as service:
        assert all(r.ok for r in service.embed_images(photos[:2]))
    for limit, error in (
        ({"supported_formats": [".gif"]}, "UnsupportedFormatError"),
        ({"max_image_size": 64, "min_image_size": 16}, "ImageTooLargeError"),
    ):
        with ImageEmbeddingService(**TINY, **limit) as service:
            results = service.embed_images(photos[:2])
        assert [type(r.error).__name__ for r in results] == [error, error], limit
        assert not any(r.cached or r.embedding is not None for r in results)


def test_cache_is_separate_per_model_and_preprocessing(photos):
    with ImageEmbeddingService(**TINY) as service:
        service.embed_images(photos)
    for other in ({"pretrained": "seed:1"}, {"exact": True}):
        with ImageEmbeddingService(**{**TINY, **other}) as service:
            assert not any(r.cached for r in service.embed_images(photos)), other


def test_clear_cache(tiny_service, photos):
    tiny_service.embed_images(photos)
    assert tiny_service.clear_cache() == len(photos)
    assert not any(r.cached for r in tiny_service.embed_images(photos))


def test_disabled_cache_never_hits(photos):
    with ImageEmbeddingService(**TINY, cache_embeddings=False) as service:
        service.embed_images(photos)
        assert not any(r.cached for r in service.embed_images(photos))


def _embed_in_process(paths, data_dir, queue):
    import os

    os.environ["IMGEMBED_DATA_DIR"] = data_dir
    with ImageEmbeddingService(**TINY, batch_size=2) as service:
        results = service.embed_images(paths)
    queue.put([None if r.error else r.embedding.tolist() for r in results])


def test_concurrent_processes_share_the_cache(all_photos, tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    paths = [str(p) for p in all_photos]
    workers = [
        context.Process(target=_embed_in_process, args=(paths, str(tmp_path / "shared"), queue))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outputs = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)
    with ImageEmbeddingService(**TINY, data_dir=tmp_path / "shared") as service:
        again = service.embed_images(paths)
    assert all(r.cached for r in again)
    np.testing.assert_allclose(_vectors(again), outputs[0], atol=1e-6)
