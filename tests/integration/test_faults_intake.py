"""Hostile inputs at the intake: decoding memory per image (peak RSS measured in a separate
process), files with tens of thousands of frames, local paths that are not regular files or
read slowly, and the sizes printed when a file is too large."""

import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgembed import ImageEmbeddingService, ImageNotFoundError, ImageTooLargeError
from imgembed.intake import budget, sources
from imgembed.intake.decode import FRAME_SCAN_LIMIT, Limits, decode
from tests.conftest import TINY

MB = 1 << 20
PIXELS = 100_000_000  # the default max_image_pixels
STRIP_BUFFERS = 64 * MB  # the conversion's strips, per image on top of the estimate


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_big_png(path: Path, width: int, height: int, depth: int, colour: int) -> Path:
    """A horizontal ramp repeated on every row (PNG filter "Up": all-zero rows after the
    first), compressed ~200:1, written without ever holding the pixels in memory."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    top = (1 << depth) - 1
    ramp = np.linspace(0, top, width).astype(">u2" if depth == 16 else "u1")
    row = np.repeat(ramp[:, None], channels, axis=1)
    if colour in (4, 6):
        row[:, -1] = top // 2  # half transparent: compositing onto white has work to do
    compressor = zlib.compressobj(1)
    first = b"\x00" + row.tobytes()
    same = b"\x02" + bytes(len(first) - 1)
    with path.open("wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n")
        out.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)))
        data = [compressor.compress(first)]
        data += [compressor.compress(same) for _ in range(height - 1)]
        data.append(compressor.flush())
        out.write(_chunk(b"IDAT", b"".join(data)))
        out.write(_chunk(b"IEND", b""))
    return path


_MEASURE = """
import json, sys
from imgembed import ImageEmbeddingService

def peak():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) * 1024

settings = json.loads(sys.argv[1])
with ImageEmbeddingService(**settings) as service:
    service.embed_images([sys.argv[2]])  # the model loaded and one small photo embedded
    before = peak()
    results = service.embed_images(sys.argv[3:])
    print(json.dumps({"before": before, "after": peak(), "workers": service.settings.workers,
                      "errors": [None if r.ok else str(r.error) for r in results]}))
"""


@pytest.fixture(scope="module")
def big_images(tmp_path_factory) -> dict[str, list[Path]]:
    """10000x10000 pixels, 16-bit grey (~0.9 MB) and 16-bit RGBA (~3.5 MB); and a 7000x7000
    WebP (24 KB), which libwebp decodes through buffers of its own."""
    folder = tmp_path_factory.mktemp("big")
    ramp = np.zeros((7000, 7000, 3), dtype=np.uint8)
    ramp[..., 0] = np.linspace(0, 255, 7000).astype(np.uint8)
    Image.fromarray(ramp).save(folder / "big.webp", lossless=True, quality=0, method=0)
    return {
        "png": [
            write_big_png(folder / "grey16.png", 10_000, 10_000, 16, 0),
            write_big_png(folder / "rgba16.png", 10_000, 10_000, 16, 6),
        ],
        "webp": [folder / "big.webp"],
    }


def _estimate(path: Path, exact: bool) -> int:
    with Image.open(path) as image:
        return budget.decode_bytes(image, full_size_rgb=exact)


@pytest.mark.parametrize(
    ("kind", "mode"), [("png", "default"), ("png", "exact"), ("webp", "default")]
)
def test_peak_memory_per_image_stays_within_the_estimate(big_images, photos, kind, mode):
    """Peak RSS while the images decode (at once, one per decode slot) stays within what
    budget.py estimates for them, and each estimate within the budget. Before, the two PNGs
    took 4.4 GB (16-bit grey went through float64 at full size)."""
    paths, exact = big_images[kind], mode == "exact"
    settings = {**TINY, "cache_embeddings": False, "exact": exact}
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(settings), str(photos[0]), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout)
    assert measured["errors"] == [None] * len(paths)
    estimates = sorted((_estimate(path, exact) for path in paths), reverse=True)
    assert max(estimates) <= budget.BYTES_PER_PIXEL * PIXELS
    in_flight = estimates[: measured["workers"]]
    bound = sum(in_flight) + len(in_flight) * STRIP_BUFFERS
    extra = measured["after"] - measured["before"]
    print(f"{kind} {mode}: peak RSS +{extra / MB:.0f} MB, estimated {sum(in_flight) / MB:.0f}")
    assert extra < bound


def test_images_over_the_memory_budget_are_refused(tmp_path):
    """With max_image_pixels = 4 million the budget is 32 MB: a 2000x2000 WebP needs about
    64 MB (libwebp's buffers), a PNG of the same size fits in both modes."""
    picture = Image.fromarray(np.full((2000, 2000, 4), 128, dtype=np.uint8))
    picture.save(tmp_path / "a.webp", lossless=True)
    picture.save(tmp_path / "a.png")
    limits = Limits(max_pixels=4_000_000)
    with pytest.raises(ImageTooLargeError, match=r"2000x2000 WEBP RGBA pixels need about 61 MB"):
        decode((tmp_path / "a.webp").read_bytes(), "x", limits, draft_min_side=448)
    for draft_min_side in (448, None):
        assert decode((tmp_path / "a.png").read_bytes(), "x", limits, draft_min_side).image


def test_deep_images_are_reduced_then_scaled(tmp_path):
    """Outside exact mode the RGB result is reduced (small); the 16-bit scaling stays exact."""
    path = write_big_png(tmp_path / "grey16.png", 3000, 2000, 16, 0)
    full = decode(path.read_bytes(), "x", Limits()).image
    reduced = decode(path.read_bytes(), "x", Limits(), draft_min_side=448).image
    assert full.size == (3000, 2000) and reduced.size == (750, 500)  # reduced by 4
    ramp = np.linspace(0, 65535, 3000).astype(np.uint16)
    expected = np.rint(ramp / 65535 * 255)
    np.testing.assert_array_equal(np.asarray(full)[1000, :, 0], expected)
    block_means = expected.reshape(750, 4).mean(axis=1)
    np.testing.assert_allclose(np.asarray(reduced)[0, :, 0], block_means, atol=1)


def _many_frame_gif(frames: int) -> bytes:
    """A 64x64 GIF followed by `frames` 1x1 frames of 22 bytes each."""
    buffer = io.BytesIO()
    Image.new("P", (64, 64)).save(buffer, format="GIF")
    frame = (
        b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms
        + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # a 1x1 image
        + b"\x02\x02\x44\x01\x00"  # its LZW data: clear, pixel 0, end
    )  # fmt: skip
    return buffer.getvalue()[:-1] + frame * frames + b"\x3b"


def _many_page_tiff(pages: int, side: int = 64) -> bytes:
    """`pages` grey pages that share one strip of pixels: ~100 bytes a page."""
    entries = 8
    ifd_size = 2 + 12 * entries + 4
    first = 8 + side * side
    out = [b"II*\x00", struct.pack("<I", first), bytes(i % 256 for i in range(side * side))]
    for page in range(pages):
        following = first + (page + 1) * ifd_size if page + 1 < pages else 0
        tags = [(256, 3, side), (257, 3, side), (258, 3, 8), (259, 3, 1), (262, 3, 1),
                (273, 4, 8), (278, 3, side), (279, 4, side * side)]  # fmt: skip
        out.append(struct.pack("<H", entries))
        out += [struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags]
        out.append(struct.pack("<I", following))
    return b"".join(out)


@pytest.mark.parametrize(
    ("build", "count"), [(_many_frame_gif, 450_000), (_many_page_tiff, 98_000)], ids=["gif", "tiff"]
)
def test_tens_of_thousands_of_frames_are_not_counted(tiny_service, photos, build, count):
    """10 MB files; Pillow's own count of the TIFF's pages takes two minutes here."""
    data = build(count)
    assert 9 * MB < len(data) < 10 * MB
    tiny_service.embed_images([photos[0]])  # warm up: we time the file, not the first call
    started = time.perf_counter()
    (result,) = tiny_service.embed_images([data])
    assert time.perf_counter() - started < 20
    assert result.ok and result.metadata["width"] == 64
    assert result.metadata["frames"] is None and result.metadata["animated"] is True


@pytest.mark.parametrize(
    ("build", "count", "frames"),
    [
        (_many_frame_gif, 5, 6),
        (_many_frame_gif, FRAME_SCAN_LIMIT - 1, FRAME_SCAN_LIMIT),
        (_many_frame_gif, FRAME_SCAN_LIMIT, None),
        (_many_page_tiff, 3, 3),
        (_many_page_tiff, FRAME_SCAN_LIMIT, FRAME_SCAN_LIMIT),
        (_many_page_tiff, FRAME_SCAN_LIMIT + 1, None),
    ],
)
def test_frames_are_counted_up_to_the_limit(build, count, frames):
    decoded = decode(build(count), "x", Limits())
    assert decoded.metadata["frames"] == frames
    assert decoded.image.size == (64, 64)  # still the first frame


def _in_a_thread(work, timeout: float = 60):
    """Run `work`; a hang fails the test instead of the whole run."""
    box = []
    thread = threading.Thread(target=lambda: box.append(work()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the batch hung"
    return box[0]


def test_local_paths_that_are_not_regular_files_are_refused(tmp_path, photos):
    fifo, held, sock = tmp_path / "fifo.jpg", tmp_path / "held.jpg", tmp_path / "sock.jpg"
    os.mkfifo(fifo)
    os.mkfifo(held)
    writer = os.open(held, os.O_RDWR)  # a FIFO with a writer that never writes
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    sources_ = [fifo, held, "/dev/zero", "/dev/urandom", sock, tmp_path, photos[0]]
    try:
        with ImageEmbeddingService(**TINY) as service:
            results = _in_a_thread(lambda: service.embed_images(sources_))
    finally:
        os.close(writer)
        server.close()
    *refused, good = results
    assert good.ok
    for result in refused:
        assert isinstance(result.error, ImageNotFoundError), result.error
    messages = [str(r.error) for r in refused]
    assert messages[0].endswith("not a regular file (a FIFO)")
    assert messages[1].endswith("not a regular file (a FIFO)")
    assert messages[2].endswith("not a regular file (a character device)")
    assert messages[3].endswith("not a regular file (a character device)")
    assert messages[5].endswith("not a file (a directory)")


def test_a_proc_file_is_read_within_the_size_limit():
    """/proc files say they are empty; the size cap holds all the same."""
    with ImageEmbeddingService(**TINY, max_file_size=1000) as service:
        (result,) = service.embed_images(["/proc/self/status"])
    assert isinstance(result.error, ImageTooLargeError)
    assert "more than 1,000 bytes, over the limit (max_file_size)" in str(result.error)


def test_too_large_files_report_their_real_size(tmp_path, photos):
    big = tmp_path / "big.jpg"
    big.write_bytes(photos[0].read_bytes() + bytes(1_500_000))
    size = big.stat().st_size
    with ImageEmbeddingService(**TINY, max_file_size=1_000_000) as service:
        (result,) = service.embed_images([big])
    assert isinstance(result.error, ImageTooLargeError)
    assert f"{size:,} bytes, over the limit of 1,000,000 (max_file_size)" in str(result.error)


def test_a_slow_local_read_stops_at_the_deadline(tmp_path, photos, monkeypatch):
    """A file system that delivers slowly (a dying disk or network mount): each chunk takes
    0.2 s here, and the read ends at the deadline instead of after the whole file."""
    path = tmp_path / "slow.jpg"
    path.write_bytes(bytes(5 * sources.READ_CHUNK))
    real_read = os.read

    def slow_read(fd, size):
        time.sleep(0.2)
        return real_read(fd, size)

    with ImageEmbeddingService(**TINY, fetch_deadline=0.3) as service:
        with monkeypatch.context() as patch:
            patch.setattr(sources.os, "read", slow_read)
            (slow,) = service.embed_images([path])
        (fine,) = service.embed_images([photos[0]])
    assert isinstance(slow.error, ImageNotFoundError)
    assert "not read within 0.3 s (fetch_deadline)" in str(slow.error)
    assert fine.ok
