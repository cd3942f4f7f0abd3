"""Decoding bytes into the RGB image the model transform starts from.

What intake does before the model's own transform, so results match
`preprocess(Image.open(p).convert("RGB"))` for ordinary photos:
- limits are checked on the header, before any pixel is decoded (format, pixel count,
  longest and shortest side);
- the first frame of an animation is used;
- EXIF orientation is applied (a rotated phone photo is embedded upright);
- transparency is composited onto white (product cut-outs), instead of exposing the
  arbitrary colour stored under transparent pixels;
- 16-bit and float images are scaled to 8 bits (not clipped); CMYK, palette and greyscale
  are converted by Pillow. Embedded ICC profiles are not applied: neither open_clip's
  reference nor CLIP's training data applied them;
- large JPEGs may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling), and any other
  large image reduced by an integer factor (box filter) before conversion, while the short
  side stays at least `draft_min_side`; off in exact mode.

Memory: the conversion to RGB works in strips of STRIP_PIXELS, so beside the decoded image
it holds only the RGB result: the reduced one (small), or in exact mode the full-size one.
Images whose decoding would take more than the budget are refused first (`budget.py`).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pillow_heif
from PIL import ExifTags, Image, UnidentifiedImageError

from imgembed.config import DEFAULT_FORMATS
from imgembed.errors import (
    ConfigurationError,
    ImageTooLargeError,
    ImageTooSmallError,
    ImgEmbedError,
    InvalidImageError,
    UnsupportedFormatError,
)
from imgembed.intake import budget

pillow_heif.register_heif_opener()

BACKGROUND = (255, 255, 255)
# TIFF codecs that libtiff builds may leave out (Pillow's wheels lack webp); it then says
# so on stderr only, and Pillow raises a bare "decoder error -2"
_OPTIONAL_TIFF_CODECS = frozenset({"webp", "zstd", "lzma"})
_JPEG_FAMILY = {"JPEG", "MPO"}  # phones write JPEGs that Pillow reports as MPO
FRAME_SCAN_LIMIT = 1000  # GIF frames or TIFF pages walked to count them
STRIP_PIXELS = 1 << 20  # pixels converted at a time (float64 scaling: ~8 MB per temporary)
# EXIF orientation -> the operation that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Where Pillow finds an orientation (getexif reads XMP's tiff:Orientation too).
_ORIENTATION_INFO = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")
_QUARTER_TURNS = {_UPRIGHT[k] for k in (5, 6, 7, 8)}  # these swap width and height


def pil_formats(extensions: Iterable[str]) -> frozenset[str]:
    """Pillow format names for file extensions such as ".jpg" (Pillow's own registry). An
    extension no format has (".pgn"), or none at all, is a setting to fix: it would refuse
    images later, one by one, for a reason given nowhere else."""
    extensions = list(extensions)
    registered = Image.registered_extensions()
    unknown = [ext for ext in extensions if ext not in registered]
    if unknown or not extensions:
        known = ", ".join(DEFAULT_FORMATS)
        what = f"{', '.join(unknown)} is no image format" if unknown else "no format is given"
        raise ConfigurationError(
            f"invalid settings: IMGEMBED_SUPPORTED_FORMATS (supported_formats): {what} "
            f"(formats are e.g. {known})"
        )
    names = {registered[ext] for ext in extensions}
    return frozenset(names | _JPEG_FAMILY if names & _JPEG_FAMILY else names)


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 100_000_000
    max_side: int = 30_000
    min_side: int = 32
    formats: frozenset[str] | None = None  # Pillow format names; None accepts any

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(
            max_pixels=settings.max_image_pixels,
            max_side=settings.max_image_size,
            min_side=settings.min_image_size,
            formats=pil_formats(settings.supported_formats),
        )

    def check(self, image: Image.Image, source: str) -> None:
        """Refuse by the header alone: nothing has been decoded yet."""
        if self.formats is not None and image.format and image.format not in self.formats:
            accepted = ", ".join(sorted(self.formats))
            raise UnsupportedFormatError(
                f"{image.format} images are not accepted (supported_formats: {accepted})", source
            )
        width, height = image.size
        if width * height > self.max_pixels:
            raise ImageTooLargeError(
                f"{width}x{height} pixels, over the limit of {self.max_pixels:,} "
                "(max_image_pixels)",
                source,
            )
        if max(width, height) > self.max_side:
            raise ImageTooLargeError(
                f"{width}x{height} pixels, a side over {self.max_side} (max_image_size: a limit,"
                " not a size to scale to; raise it or leave it out)",
                source,
            )
        if min(width, height) < self.min_side:
            raise ImageTooSmallError(
                f"{width}x{height} pixels, shorter side under {self.min_side} (min_image_size)",
                source,
            )


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, upright
    metadata: dict[str, Any]


def open_image(data: bytes, source: str) -> Image.Image:
    """Open (parse the header of) an image; pixels are decoded later, by `load`."""
    if not data:  # a file still being written, an upload or download that sent nothing
        raise InvalidImageError("empty (0 bytes): no image in it", source)
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        if kind := _other_format(data):
            raise UnsupportedFormatError(
                f"{kind}, a format imgembed does not read: convert it to PNG or JPEG", source
            ) from exc
        raise _decode_error(exc, source) from exc
    except Exception as exc:
        raise _decode_error(exc, source) from exc


_SVG_START = re.compile(rb"\s*(<\?xml|<!--|<!doctype\s+svg|<svg)", re.IGNORECASE)


def _other_format(data: bytes) -> str | None:
    """What Pillow cannot open but people send as images: named, a 415 and not "corrupt"."""
    head = data[:1024].removeprefix(b"\xef\xbb\xbf")
    if _SVG_START.match(head) and b"<svg" in head.lower():
        return "an SVG (vector) image"
    if head.startswith(b"%PDF-"):
        return "a PDF document"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "a JPEG XL image"
    return None


def decode(data: bytes, source: str, limits: Limits, draft_min_side: int | None = None) -> Decoded:
    image = open_image(data, source)
    limits.check(image, source)
    budget.check(image, _reduction(image.size, draft_min_side) == 1, limits.max_pixels, source)
    metadata = image_metadata(image, len(data))
    compression = image.info.get("compression") if image.format == "TIFF" else None
    try:
        if draft_min_side and image.format == "JPEG":
            _draft(image, draft_min_side)
        image.load()
        turn = _upright(image)
        rgb = to_rgb(image, _reduction(image.size, draft_min_side))
        del image  # free the decoded original before the upright copy is made
        return Decoded(_turned(rgb, turn), metadata)
    except ImgEmbedError:
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and compression in _OPTIONAL_TIFF_CODECS:
            raise UnsupportedFormatError(
                f"cannot decode this TIFF's {compression!r} compression ({exc}): this "
                "libtiff may be built without it; convert it to an LZW or uncompressed TIFF, "
                "or to PNG",
                source,
            ) from exc
        raise _decode_error(exc, source) from exc


def upright_rgb(image: Image.Image) -> Image.Image:
    """An image already in memory (a PIL input), upright and RGB, at full size."""
    return _turned(to_rgb(image), _upright(image))


def _turned(rgb: Image.Image, turn: Image.Transpose | None) -> Image.Image:
    """The image turned upright. An RGB image keeps its original's EXIF and XMP (`info`),
    which still say to turn it: they go, as ImageOps.exif_transpose removes them, so the
    upright image (preprocess_image's) is not turned a second time when read again."""
    if turn is None:
        return rgb
    upright = rgb.transpose(turn)
    for key in _ORIENTATION_INFO:
        upright.info.pop(key, None)
    return upright


def _header_upright(image: Image.Image) -> Image.Transpose | None:
    """`_upright` from the header alone. Pillow's TIFF reader gives the upright size itself
    (and turns the pixels on load); a PNG's getexif would decode the whole image to look
    for an eXIf chunk after the pixels, so only one before them counts here."""
    if image.format == "TIFF" or (image.format == "PNG" and "exif" not in image.info):
        return None
    return _upright(image)


def _upright(image: Image.Image) -> Image.Transpose | None:
    try:
        return _UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation))
    except Exception:  # malformed EXIF: keep the image as stored
        return None


def _reduction(size: tuple[int, int], min_side: int | None) -> int:
    """The integer factor that keeps the short side at least `min_side` (1: none)."""
    return max(1, min(size) // min_side) if min_side else 1


def _decode_error(exc: Exception, source: str) -> ImgEmbedError:
    # Decoders of untrusted data throw all kinds of exceptions; each becomes a typed error.
    if isinstance(exc, Image.DecompressionBombError):  # Pillow's own limit, 2 x its default
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(claimed[1]):,} pixels" if claimed else str(exc)
        return ImageTooLargeError(
            f"{size} in its header, more than Pillow opens (a decompression bomb?): refused "
            "before decoding",
            source,
        )
    if isinstance(exc, UnidentifiedImageError):
        return InvalidImageError("not a recognised image (unknown format or corrupt)", source)
    return InvalidImageError(f"cannot decode image: {exc}", source)


def to_rgb(image: Image.Image, factor: int = 1) -> Image.Image:
    """RGB, reduced by `factor`; converted strip by strip, so no full-size intermediate is
    made beside the result (per pixel the same as converting the whole image at once)."""
    if image.mode == "RGB":
        return image.reduce(factor) if factor > 1 else image
    top = _scale_top(image) if _is_deep(image) else None
    width, height = image.size
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    rows = max(1, STRIP_PIXELS // (width * factor)) * factor  # whole reduction blocks
    for y in range(0, height, rows):
        strip = _strip_to_rgb(image.crop((0, y, width, min(height, y + rows))), top)
        out.paste(strip.reduce(factor) if factor > 1 else strip, (0, y // factor))
    return out


def _strip_to_rgb(image: Image.Image, top: float | None) -> Image.Image:
    if top is not None:
        image = _to_8bit(image, top)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _is_deep(image: Image.Image) -> bool:
    return image.mode.startswith("I") or image.mode == "F"


def _scale_top(image: Image.Image) -> float:
    """The value that maps to 255: 1 or 255 for float images, else the smallest of 255,
    65535 and the peak that holds every pixel (so 16-bit data is scaled, not clipped)."""
    width, height = image.size
    rows = max(1, STRIP_PIXELS // width)
    peaks = [
        np.fmax.reduce(np.asarray(image.crop((0, y, width, min(height, y + rows)))), axis=None)
        for y in range(0, height, rows)
    ]
    peak = float(np.fmax.reduce(peaks))  # NaN only if every pixel is NaN
    if image.mode == "F":
        return 1.0 if peak <= 1.0 else 255.0
    return 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak


def _to_8bit(image: Image.Image, top: float) -> Image.Image:
    """16/32-bit integer and float greyscale to 8 bits by scaling, where Pillow would clip."""
    pixels = np.asarray(image, dtype=np.float64)
    scaled = np.nan_to_num(pixels / top * 255.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _draft(image: Image.Image, min_side: int) -> None:
    width, height = image.size
    short = min(width, height)
    if short >= 2 * min_side:
        image.draft(None, (max(1, width * min_side // short), max(1, height * min_side // short)))


def image_metadata(image: Image.Image, size: int | None) -> dict[str, Any]:
    """Basic metadata from an opened image (its header; pixels are not decoded). Width and
    height are the upright image's, as it is shown and embedded (a phone photo held upright
    is stored sideways with an EXIF orientation)."""
    dpi = image.info.get("dpi")
    frames = _frames(image)
    width, height = image.size
    if _header_upright(image) in _QUARTER_TURNS:
        width, height = height, width
    return {
        "width": width,
        "height": height,
        "format": image.format,
        "mode": image.mode,
        "size": size,
        "dpi": _dpi(dpi),
        "animated": frames is None or frames > 1,
        "frames": frames,
        "has_transparency": image.has_transparency_data,
    }


def _frames(image: Image.Image) -> int | None:
    """The number of frames or pages. Most formats state it in their header. GIF and TIFF do
    not: Pillow walks the whole file to count (tens of seconds for tens of thousands of TIFF
    pages), so here at most FRAME_SCAN_LIMIT frames are walked and a longer file gives None
    (unknown: more than the limit). Frame 0 is selected again afterwards."""
    if image.format not in ("GIF", "TIFF"):
        try:
            return int(getattr(image, "n_frames", 1))
        except Exception:  # counting frames of a broken animation may fail; it is still frame 0
            return 1
    count = 1
    try:
        while count <= FRAME_SCAN_LIMIT:
            if image.format == "GIF":  # its public seek decodes each frame; n_frames' walk not
                image._seek(count, False)  # type: ignore[attr-defined]
            else:
                image.seek(count)
            count += 1
        return None
    except Exception:  # EOFError after the last frame; a broken frame ends the count too
        return count
    finally:
        with contextlib.suppress(Exception):
            image.seek(0)


def _dpi(value: Any) -> list[int] | None:
    """Whole dots per inch, as the seed's ImageMetadata has them (a PNG's pixels per metre
    come back as 299.999 for 300)."""
    try:
        return [round(float(v)) for v in value] if value else None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
