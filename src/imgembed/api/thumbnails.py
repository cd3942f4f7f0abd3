"""JPEG thumbnails of stored images for the page, read through the service's intake (its
allowed roots, size limits and download rules apply)."""

from __future__ import annotations

import io

from fastapi.responses import Response

from imgembed.intake.image_input import Input
from imgembed.service import ImageEmbeddingService


def thumbnail_response(service: ImageEmbeddingService, source: Input, size: int) -> Response:
    intake = service.intake
    image = intake.read(source).decode(intake.limits, draft_min_side=size).image
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    headers = {"Cache-Control": "private, max-age=300"}
    return Response(buffer.getvalue(), media_type="image/jpeg", headers=headers)
