"""The batch pipeline: order, per-item typed errors, progress, normalisation, threads."""

import functools
import struct
import threading
import time
import zlib

import numpy as np
import pytest

from imgembed import (
    ImageEmbeddingService,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidSourceError,
)
from tests.conftest import TINY


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.fixture
def bad_inputs(photos, tmp_path):
    jpeg = next(p for p in photos if p.suffix == ".jpg").read_bytes()
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    return {
        "missing": (tmp_path / "missing.jpg", ImageNotFoundError),
        "folder": (tmp_path, ImageNotFoundError),
        "garbage": (b"this is not an image at all", InvalidImageError),
        "truncated": (jpeg[: len(jpeg) // 2], InvalidImageError),
        "empty": (empty, InvalidImageError),
        "bomb": (_png_header_only(40_000, 40_000), ImageTooLargeError),
    }


def test_order_and_per_item_errors(photos, bad_inputs):
    sources, expected = [], []
    for photo, (bad, error) in zip(photos, bad_inputs.values(), strict=False):
        sources += [photo, bad]
        expected += [None, error]
    with ImageEmbeddingService(**TINY, batch_size=3) as service:  # errors spread over chunks
        results = service.embed_images(sources)
    assert len(results) == len(sources)
    for source, result, error in zip(sources, results, expected, strict=True):
        if error is None:
            assert result.ok and result.image_path == str(source)
            assert result.embedding.shape == (64,)
            assert result.metadata["width"] > 0
        else:
            assert isinstance(result.error, error), (source, result.error)
            assert result.embedding is None
            assert str(result.error)  # a message a person can act on


def test_a_value_that_is_no_image_source_fails_alone(tiny_service, photos):
    """A list with gaps ([row.get("image") ...]): None or a number fails with its typed
    error; the batch goes on (it raised a TypeError and lost every result)."""
    results = tiny_service.embed_images([photos[0], None, 123, photos[1]])
    assert [r.ok for r in results] == [True, False, False, True]
    assert isinstance(results[1].error, InvalidSourceError)
    assert str(results[1].error).startswith("<NoneType>: not an image source: None")
    assert results[2].image_path == "<int>" and "123" in str(results[2].error)


def test_bomb_is_refused_before_decoding(tiny_service, bad_inputs):
    bomb, _ = bad_inputs["bomb"]
    tiny_service.encoder  # noqa: B018 - load the model first: we time the refusal
    started = time.perf_counter()
    (result,) = tiny_service.embed_images([bomb])
    assert isinstance(result.error, ImageTooLargeError)
    assert "1,600,000,000 pixels" in str(result.error)  # Pillow's own bomb guard fires first
    assert time.perf_counter() - started < 10  # decoding 1.6 Gpx would take minutes


def test_file_size_and_pixel_limits(photos):
    with ImageEmbeddingService(**TINY, max_file_size=1000, max_image_pixels=10**9) as service:
        (result,) = service.embed_images([photos[0]])
        assert isinstance(result.error, ImageTooLargeError)
        assert "max_file_size" in str(result.error)
    with ImageEmbeddingService(**TINY, max_image_pixels=10_000) as service:
        (result,) = service.embed_images([photos[0]])
        assert isinstance(result.error, ImageTooLargeError)
        assert "max_image_pixels" in str(result.error)


def test_single_image_raises_its_typed_error(tiny_service, bad_inputs):
    with pytest.raises(ImageNotFoundError, match=r"missing\.jpg"):
        tiny_service.embed_image(bad_inputs["missing"][0])


def test_path_bytes_and_pil_image_give_the_same_vector(photos):
    from PIL import Image

    with ImageEmbeddingService(**TINY, exact=True) as service:
        for photo in photos:
            from_path = service.embed_image(photo)
            np.testing.assert_array_equal(from_path, service.embed_image(photo.read_bytes()))
            with Image.open(photo) as image:
                from_pil = service.embed_image(image)
            np.testing.assert_allclose(from_pil, from_path, atol=1e-6)
        (result,) = service.embed_images([Image.open(photos[0])])
        assert result.image_path.startswith("<PIL image ") and result.metadata["width"] > 0
        again = service.embed_images([Image.open(photos[0])])
        assert again[0].cached and again[0].image_id == result.image_id


def test_pil_image_respects_the_pixel_limit(photos):
    from PIL import Image

    with ImageEmbeddingService(**TINY, max_image_pixels=1000) as service:
        (result,) = service.embed_images([Image.open(photos[0])])
    assert isinstance(result.error, ImageTooLargeError)


def test_progress_callback_counts(all_photos):
    snapshots = []
    sources = [*all_photos, "/nonexistent/x.jpg"]
    with ImageEmbeddingService(**TINY, batch_size=4) as service:
        service.embed_images(sources, progress=snapshots.append)
    seen = [(p.done, p.failed, p.total) for p in snapshots]
    assert len(seen) == -(-len(sources) // 4)  # once per batch
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)
    assert seen[-1] == (len(sources), 1, len(sources))


def test_embeddings_are_normalised_unless_asked(photos):
    with ImageEmbeddingService(**TINY, cache_embeddings=False) as normalised:
        unit = np.stack([r.embedding for r in normalised.embed_images(photos)])
        texts = normalised.embed_texts(["a", "b"])
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    with ImageEmbeddingService(**TINY, normalize=False, cache_embeddings=False) as raw_service:
        raw = np.stack([r.embedding for r in raw_service.embed_images(photos)])
    norms = np.linalg.norm(raw, axis=1)
    assert np.all(np.abs(norms - 1) > 1e-3)
    np.testing.assert_allclose(raw / norms[:, None], unit, atol=1e-5)


def test_batch_size_does_not_change_vectors(photos):
    vectors = []
    for batch_size in (1, 4, 32):
        with ImageEmbeddingService(**TINY, batch_size=batch_size, cache_embeddings=False) as s:
            vectors.append(np.stack([r.embedding for r in s.embed_images(photos)]))
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-5)


def test_threads_share_one_service(tiny_service, photos):
    expected = np.stack([r.embedding for r in tiny_service.embed_images(photos)])
    outputs, errors = {}, []

    def work(n):
        try:
            outputs[n] = np.stack([r.embedding for r in tiny_service.embed_images(photos)])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for out in outputs.values():
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_empty_input(tiny_service):
    assert tiny_service.embed_images([]) == []
    assert tiny_service.embed_texts([]).shape == (0, 64)


def _counting_reads(service, monkeypatch, before=None):
    """Records when each input is read (in the worker threads); `before(source)` runs first."""
    reads = []
    real = service.intake.read

    def read(source):
        reads.append(time.perf_counter())
        if before is not None:
            before(source)
        return real(source)

    monkeypatch.setattr(service.intake, "read", read)
    return reads


def _wait_until(condition, timeout: float = 60) -> bool:
    """Polls `condition`: a generous timeout that only a failing test ever reaches."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _at_least(items: list, count: int) -> bool:
    return len(items) >= count


def test_work_in_flight_is_bounded(photos, monkeypatch):
    """A long run never reads more than the chunk being encoded plus PREFETCH_CHUNKS ahead,
    however slowly results are consumed: memory stays flat on any number of images."""
    from imgembed.engine.pipeline import PREFETCH_CHUNKS

    with ImageEmbeddingService(**TINY, batch_size=8, cache_embeddings=False) as service:
        reads = _counting_reads(service, monkeypatch)
        sources = (photos * 100)[:600]
        ahead = []
        for done, result in enumerate(service.iter_images(sources), start=1):
            assert result.ok
            if done % 50 == 0:  # a slow consumer: the workers read as far ahead as they may
                target = min(done + PREFETCH_CHUNKS * 8, len(sources))
                assert _wait_until(functools.partial(_at_least, reads, target)), "no read-ahead"
                time.sleep(0.2)  # and have time to read further, if they could
            ahead.append(len(reads) - done)
    assert len(reads) == len(sources)
    assert max(ahead) <= (PREFETCH_CHUNKS + 1) * 8


def test_decoding_overlaps_encoding(photos, tmp_path, monkeypatch):
    """Inputs after the first chunk may only be read once the first chunk is being encoded,
    and that encode waits until one of them is read: a pipeline that decodes only between
    encodes cannot pass (the wait would run out). No timing is involved."""
    sources = []
    for i in range(16):
        photo = photos[i % len(photos)]
        sources.append(tmp_path / f"{i:02d}{photo.suffix}")
        sources[-1].write_bytes(photo.read_bytes())
    encoding = threading.Event()
    later_reads = []

    def gate(source):
        if int(source.stem) >= 4:  # not in the first chunk
            assert encoding.wait(60)
            later_reads.append(source)

    overlapped = []
    with ImageEmbeddingService(**TINY, batch_size=4, cache_embeddings=False) as service:
        encoder = service.encoder
        _counting_reads(service, monkeypatch, before=gate)
        real = encoder.encode_images

        def encode(batch):
            if not encoding.is_set():
                encoding.set()
                overlapped.append(_wait_until(functools.partial(_at_least, later_reads, 1)))
            return real(batch)

        monkeypatch.setattr(encoder, "encode_images", encode)
        results = service.embed_images(sources)
    assert all(r.ok for r in results)
    assert overlapped == [True], "the next chunk must be read while one is encoded"
