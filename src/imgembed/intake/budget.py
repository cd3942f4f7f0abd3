"""The memory one image may take while it is decoded: BYTES_PER_PIXEL x max_image_pixels
(800 MB at the default 100 million pixels), checked against an estimate made from the
header, before any pixel is decoded.

The estimate, from peak RSS measured around `decode` (tests/integration/test_faults_intake.py):
- Pillow keeps 1 byte per pixel for modes 1, L and P, 2 for 16-bit grey and 4 for every other
  mode (a 16-bit RGBA PNG decodes to 8-bit RGBA);
- some decoders hold full-size buffers of their own beside it: libwebp about 12 bytes per
  pixel, libavif and libheif about 6, OpenJPEG about 12; libtiff one strip or tile of samples
  (for an image stored in one strip, all of it);
- a non-RGB image converted at full size (exact mode, or too small to reduce) also has its RGB
  result, 4 bytes per pixel; the conversion's strip buffers (tens of MB) come on top.
So PNG, JPEG, GIF, BMP and striped TIFF fit at any size up to max_image_pixels, in both
modes; a WebP above 50 million pixels, for example, does not.
"""

from __future__ import annotations

from PIL import Image

from imgembed.errors import ImageTooLargeError

BYTES_PER_PIXEL = 8
_STORAGE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_DECODER_BUFFERS = {"WEBP": 12, "AVIF": 6, "HEIF": 6, "JPEG2000": 12}
_MB = 1 << 20


def check(image: Image.Image, full_size_rgb: bool, max_pixels: int, source: str) -> None:
    """Refuse an image whose decoding would take more than the budget."""
    needed = decode_bytes(image, full_size_rgb)
    budget = BYTES_PER_PIXEL * max_pixels
    if needed > budget:
        width, height = image.size
        raise ImageTooLargeError(
            f"{width}x{height} {image.format} {image.mode} pixels need about "
            f"{needed / _MB:,.0f} MB to decode, over the budget of {budget / _MB:,.0f} MB "
            f"({BYTES_PER_PIXEL} bytes x max_image_pixels)",
            source,
        )


def decode_bytes(image: Image.Image, full_size_rgb: bool) -> int:
    """Peak bytes to decode `image` (opened, not loaded) and convert it to RGB."""
    width, height = image.size
    per_pixel = _STORAGE.get(image.mode, 4) + _DECODER_BUFFERS.get(image.format or "", 0)
    if full_size_rgb and image.mode != "RGB":
        per_pixel += 4
    return width * height * per_pixel + _libtiff_buffer(image)


def _libtiff_buffer(image: Image.Image) -> int:
    """libtiff decodes a strip (or tile) at a time into a buffer of its own; at least 4
    bytes per pixel, as when it decodes to RGBA (JPEG-compressed TIFF)."""
    if image.format != "TIFF" or not any(tile.codec_name == "libtiff" for tile in image.tile):
        return 0
    width, height = image.size
    try:
        tags = image.tag_v2  # type: ignore[attr-defined]
        bits = tags.get(258, (8,))
        samples = tags.get(277, len(bits))
        sample_bytes = (bits[0] * samples if len(bits) == 1 else sum(bits)) / 8
        if 322 in tags and 323 in tags:  # tiled
            area = int(tags[322]) * int(tags[323])
        else:
            area = width * min(height, int(tags.get(278) or height))
    except Exception:  # malformed tags: assume one strip of 16-bit RGBA
        sample_bytes, area = 8, width * height
    return int(area * max(sample_bytes, 4))
