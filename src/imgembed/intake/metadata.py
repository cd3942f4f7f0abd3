"""Extended metadata from EXIF (JPEG, TIFF, WebP, PNG, HEIC, AVIF): camera, exposure, dates,
orientation, GPS. Missing or malformed EXIF gives nulls, never an exception."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from PIL import ExifTags, Image

T = TypeVar("T")
_EXIF_DATE = "%Y:%m:%d %H:%M:%S"


def _safe(read: Callable[[], T]) -> T | None:
    try:
        return read()
    except Exception:  # EXIF in the wild is often malformed; a field we can't read is null
        return None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value).strip("\x00 ").strip() if value is not None else ""
    return text or None


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, tuple | list):
        value = value[0]
    number = float(value)
    return round(number, 6) if math.isfinite(number) else None  # x/0 rationals: NaN


def _date(value: Any, offset: Any = None) -> str | None:
    text = _text(value)
    if text is None:
        return None
    stamp = datetime.strptime(text[:19], _EXIF_DATE).isoformat()
    offset = _text(offset)
    return stamp + offset if offset and len(offset) == 6 and offset[0] in "+-" else stamp


def _degrees(dms: Any, ref: Any) -> float:
    degrees, minutes, seconds = (float(x) for x in dms)
    value = degrees + minutes / 60 + seconds / 3600
    if not math.isfinite(value):  # a 0/0 rational (NaN): no position, not a NaN one
        raise ValueError("not a finite coordinate")
    return round(-value if _text(ref) in ("S", "W") else value, 7)


def _gps(gps: dict[int, Any]) -> dict[str, float | None] | None:
    tags = ExifTags.GPS
    latitude = _safe(lambda: _degrees(gps[tags.GPSLatitude], gps.get(tags.GPSLatitudeRef)))
    longitude = _safe(lambda: _degrees(gps[tags.GPSLongitude], gps.get(tags.GPSLongitudeRef)))
    altitude = _safe(lambda: _number(gps[tags.GPSAltitude]))
    if altitude is not None and _safe(lambda: int.from_bytes(gps[tags.GPSAltitudeRef], "big")):
        altitude = -altitude  # reference 1: below sea level
    if latitude is None and longitude is None and altitude is None:
        return None
    return {"latitude": latitude, "longitude": longitude, "altitude": altitude}


def _without_nulls(values: dict[str, Any]) -> dict[str, Any] | None:
    return values if any(v is not None for v in values.values()) else None


def extended_metadata(image: Image.Image) -> dict[str, Any]:
    exif = _safe(image.getexif)
    base: Any = exif or {}
    detail: Any = _safe(lambda: exif.get_ifd(ExifTags.IFD.Exif)) if exif else None
    gps: Any = _safe(lambda: exif.get_ifd(ExifTags.IFD.GPSInfo)) if exif else None
    detail, gps = detail or {}, gps or {}
    tag, base_tag = ExifTags.Base, ExifTags.Base
    return {
        "camera_info": _without_nulls(
            {
                "make": _safe(lambda: _text(base.get(base_tag.Make))),
                "model": _safe(lambda: _text(base.get(base_tag.Model))),
                "lens": _safe(lambda: _text(detail.get(tag.LensModel))),
                "software": _safe(lambda: _text(base.get(base_tag.Software))),
            }
        ),
        "exposure": _without_nulls(
            {
                "exposure_time": _safe(lambda: _number(detail.get(tag.ExposureTime))),
                "f_number": _safe(lambda: _number(detail.get(tag.FNumber))),
                "iso": _safe(lambda: _number(detail.get(tag.ISOSpeedRatings))),
                "focal_length": _safe(lambda: _number(detail.get(tag.FocalLength))),
            }
        ),
        "creation_date": _safe(
            lambda: _date(
                detail.get(tag.DateTimeOriginal) or detail.get(tag.DateTimeDigitized),
                detail.get(tag.OffsetTimeOriginal),
            )
        ),
        "modification_date": _safe(
            lambda: _date(base.get(base_tag.DateTime), detail.get(tag.OffsetTime))
        ),
        "orientation": _safe(lambda: int(base[base_tag.Orientation])),
        "gps_info": _safe(lambda: _gps(gps)),
    }
