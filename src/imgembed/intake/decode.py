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
- large JPEGs may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) while the short
  side stays at least `draft_min_side`; off in exact mode.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from imgembed.errors import (
    ImageTooLargeError,
    ImageTooSmallError,
    ImgEmbedError,
    InvalidImageError,
    UnsupportedFormatError,
)

pillow_heif.register_heif_opener()

BACKGROUND = (255, 255, 255)
_JPEG_FAMILY = {"JPEG", "MPO"}  # phones write JPEGs that Pillow reports as MPO


def pil_formats(extensions: Iterable[str]) -> frozenset[str]:
    """Pillow format names for file extensions such as ".jpg" (Pillow's own registry)."""
    registered = Image.registered_extensions()
    names = {registered[ext] for ext in extensions if ext in registered}
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
                f"{width}x{height} pixels, a side over {self.max_side} (max_image_size)", source
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
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:
        raise _decode_error(exc, source) from exc


def decode(data: bytes, source: str, limits: Limits, draft_min_side: int | None = None) -> Decoded:
    image = open_image(data, source)
    limits.check(image, source)
    metadata = image_metadata(image, len(data))
    try:
        if draft_min_side and image.format == "JPEG":
            _draft(image, draft_min_side)
        image.load()
        return Decoded(to_rgb(ImageOps.exif_transpose(image)), metadata)
    except ImgEmbedError:
        raise
    except Exception as exc:
        raise _decode_error(exc, source) from exc


def _decode_error(exc: Exception, source: str) -> ImgEmbedError:
    # Decoders of untrusted data throw all kinds of exceptions; each becomes a typed error.
    if isinstance(exc, Image.DecompressionBombError):
        return ImageTooLargeError(f"{exc} (refused before decoding)", source)
    if isinstance(exc, UnidentifiedImageError):
        return InvalidImageError("not a recognised image (unknown format or corrupt)", source)
    return InvalidImageError(f"cannot decode image: {exc}", source)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale to 8 bits by scaling, where Pillow would clip."""
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if pixels.size and np.nanmax(pixels) <= 1.0 else 255.0
    else:
        peak = pixels.max() if pixels.size else 0
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else float(peak)
    scaled = np.nan_to_num(pixels / top * 255.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _draft(image: Image.Image, min_side: int) -> None:
    width, height = image.size
    short = min(width, height)
    if short >= 2 * min_side:
        image.draft(None, (max(1, width * min_side // short), max(1, height * min_side // short)))


def image_metadata(image: Image.Image, size: int | None) -> dict[str, Any]:
    """Basic metadata from an opened image (its header; pixels are not decoded)."""
    dpi = image.info.get("dpi")
    try:
        frames = int(getattr(image, "n_frames", 1))
    except Exception:  # counting frames of a broken animation may fail; it is still frame 0
        frames = 1
    return {
        "width": image.width,
        "height": image.height,
        "format": image.format,
        "mode": image.mode,
        "size": size,
        "dpi": _dpi(dpi),
        "animated": frames > 1,
        "frames": frames,
        "has_transparency": image.has_transparency_data,
    }


def _dpi(value: Any) -> list[float] | None:
    try:
        return [round(float(v), 3) for v in value] if value else None
    except (TypeError, ValueError, ZeroDivisionError):
        return None
