"""A property test over intake + decode + preprocess + encode: whatever the bytes (random,
truncated real files, real files with flipped header bytes, PNG and GIF headers claiming
random dimensions), the result is a finite embedding or a typed ImgEmbedError, never another
exception, and each input is done within a time bound."""

import functools
import struct
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgembed import ImageEmbeddingService, ImgEmbedError
from imgembed.engine.pipeline import DRAFT_FACTOR
from tests.conftest import TESTDATA, TINY

IMAGE_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".webp", ".bmp", ".avif", ".heic", ".mpo",
    ".ico", ".psd", ".tga", ".pcx", ".ppm",
}  # fmt: skip
FILES = sorted(
    path
    for folder in ("photos", "pillow")
    for path in (TESTDATA / folder).rglob("*")
    if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and path.stat().st_size < 300_000
)
PNGS = [p for p in FILES if p.suffix == ".png"]
GIFS = [p for p in FILES if p.suffix == ".gif"]
# Generous for a busy 2-core machine; an input that hangs or decodes gigapixels blows it.
PER_INPUT = timedelta(seconds=20)
FUZZ = settings(
    max_examples=200,
    deadline=PER_INPUT,
    database=None,  # nothing written into the worktree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.cache
def _bytes(path: Path) -> bytes:
    return path.read_bytes()


def _truncated(args: tuple[Path, float]) -> bytes:
    path, fraction = args
    data = _bytes(path)
    return data[: int(len(data) * fraction)]


def _flipped(args: tuple[Path, list[tuple[int, int]]]) -> bytes:
    path, flips = args
    data = bytearray(_bytes(path))
    for offset, mask in flips:
        if offset < len(data):
            data[offset] ^= mask
    return bytes(data)


def _png_sized(args: tuple[Path, int, int, bool]) -> bytes:
    """The IHDR chunk (always first) claims width x height; its CRC fixed or left stale."""
    path, width, height, fix_crc = args
    data = bytearray(_bytes(path))
    data[16:24] = struct.pack(">II", width, height)
    if fix_crc:
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _gif_sized(args: tuple[Path, int, int]) -> bytes:
    """The logical screen claims width x height."""
    path, width, height = args
    data = bytearray(_bytes(path))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


INPUTS = st.one_of(
    st.binary(max_size=4096),
    st.tuples(st.sampled_from(FILES), st.floats(0, 1)).map(_truncated),
    st.tuples(
        st.sampled_from(FILES),
        st.lists(st.tuples(st.integers(0, 255), st.integers(1, 255)), min_size=1, max_size=8),
    ).map(_flipped),
    st.tuples(
        st.sampled_from(PNGS), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.booleans()
    ).map(_png_sized),
    st.tuples(
        st.sampled_from(PNGS), st.integers(1, 20_000), st.integers(1, 20_000), st.just(True)
    ).map(_png_sized),
    st.tuples(st.sampled_from(GIFS), st.integers(0, 65535), st.integers(0, 65535)).map(_gif_sized),
)


@pytest.fixture(scope="module")
def service():
    with ImageEmbeddingService(**TINY, cache_embeddings=False) as s:
        s.encoder  # noqa: B018 - loaded once, before any example is timed
        yield s


def test_the_corpus_is_there():
    assert len(FILES) > 500 and len(PNGS) > 50 and len(GIFS) > 20


@FUZZ
@given(data=INPUTS)
def test_any_bytes_give_an_embedding_or_a_typed_error(service, data):
    intake, encoder = service.intake, service.encoder
    draft_min_side = DRAFT_FACTOR * encoder.preprocessor.min_side
    try:
        image_input = intake.read(data)
        image_input.metadata(extended=True)
        decoded = image_input.decode(intake.limits, draft_min_side)
        vector = encoder.encode_images(encoder.preprocessor(decoded.image)[None])[0]
    except ImgEmbedError as error:
        assert str(error)  # a message a person can act on
        return
    assert vector.shape == (service.dimension,) and np.isfinite(vector).all()
