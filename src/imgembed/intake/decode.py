"""Decoding bytes into the RGB image the model transform starts from.

What intake does before the model's own transform, so results match
`preprocess(Image.open(p).convert("RGB"))` for ordinary photos:
- EXIF orientation is applied (a rotated phone photo is embedded upright);
- transparency is composited onto white (product cut-outs), instead of exposing the
  arbitrary colour stored under transparent pixels;
- large JPEGs may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) while the short
  side stays at least `draft_min_side`; off in exact mode.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from imgembed.errors import ImageTooLargeError, ImgEmbedError, InvalidImageError

BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, upright
    metadata: dict[str, Any]


def decode(
    data: bytes, source: str, *, max_pixels: int, draft_min_side: int | None = None
) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            metadata = image_metadata(image, len(data))
            if image.width * image.height > max_pixels:
                raise ImageTooLargeError(
                    f"{image.width}x{image.height} pixels, over the limit of {max_pixels:,} "
                    "(max_image_pixels)",
                    source,
                )
            if draft_min_side and image.format == "JPEG":
                _draft(image, draft_min_side)
            image.load()
            image = ImageOps.exif_transpose(image)
            return Decoded(to_rgb(image), metadata)
    except ImgEmbedError:
        raise
    except Exception as exc:
        raise _decode_error(exc, source) from exc


def read_metadata(data: bytes, source: str) -> dict[str, Any]:
    """Basic metadata from the header alone, without decoding pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return image_metadata(Image.open(io.BytesIO(data)), len(data))
    except Exception as exc:
        raise _decode_error(exc, source) from exc


def _decode_error(exc: Exception, source: str) -> ImgEmbedError:
    # Decoders of untrusted data throw all kinds of exceptions; each becomes a typed error.
    if isinstance(exc, Image.DecompressionBombError):
        return ImageTooLargeError(str(exc), source)
    if isinstance(exc, UnidentifiedImageError):
        return InvalidImageError("not a recognised image (unknown format or corrupt)", source)
    return InvalidImageError(f"cannot decode image: {exc}", source)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _draft(image: Image.Image, min_side: int) -> None:
    width, height = image.size
    short = min(width, height)
    if short >= 2 * min_side:
        image.draft(None, (max(1, width * min_side // short), max(1, height * min_side // short)))


def image_metadata(image: Image.Image, size: int | None) -> dict[str, Any]:
    """Basic metadata from an opened image (its header; pixels are not decoded)."""
    dpi = image.info.get("dpi")
    return {
        "width": image.width,
        "height": image.height,
        "format": image.format,
        "mode": image.mode,
        "size": size,
        "dpi": [float(d) for d in dpi] if dpi else None,
        "frames": getattr(image, "n_frames", 1),
    }
