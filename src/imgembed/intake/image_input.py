"""One input image, read once, from any source: a path, raw bytes, a base64 data URI,
an http(s) URL, or a PIL image already in memory."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from imgembed.errors import InvalidSourceError
from imgembed.intake.decode import (
    Decoded,
    Limits,
    decode,
    image_metadata,
    open_image,
    upright_rgb,
)
from imgembed.intake.metadata import extended_metadata
from imgembed.intake.quality import assess
from imgembed.intake.sources import (
    Source,
    as_path,
    check_size,
    decode_base64,
    describe,
    is_data_uri,
    is_url,
    read_file,
)

if TYPE_CHECKING:
    from imgembed.intake.fetch import Fetcher

Input = Source | Image.Image


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ImageInput:
    label: str
    digest: str  # SHA-256 of the file's bytes (of mode, size and pixels for a PIL image)
    data: bytes | None = None
    image: Image.Image | None = None

    def metadata(self, extended: bool = False, limits: Limits | None = None) -> dict[str, Any]:
        """Header metadata (no pixels decoded); with `extended`, EXIF camera/exposure/GPS too.
        With `limits`, an image they refuse raises as its decode would (a cache hit is
        refused like a miss: the settings may have changed since it was stored)."""
        image = self.image if self.image is not None else open_image(self.data, self.label)
        if limits is not None:
            limits.check(image, self.label)
        size = None if self.data is None else len(self.data)
        metadata = {**image_metadata(image, size), "content_hash": self.digest}
        return {**metadata, **extended_metadata(image)} if extended else metadata

    def decode(self, limits: Limits, draft_min_side: int | None = None) -> Decoded:
        if self.data is not None:
            decoded = decode(self.data, self.label, limits, draft_min_side)
            return Decoded(decoded.image, {**decoded.metadata, "content_hash": self.digest})
        assert self.image is not None
        limits.check(self.image, self.label)
        return Decoded(upright_rgb(self.image), self.metadata())


class Intake:
    """Reads inputs under one set of limits; shared by the threads of a service."""

    def __init__(self, settings: Any, fetcher: Fetcher | None = None):
        """`fetcher` replaces the one built from settings (tests use it for policies)."""
        self.settings = settings
        self.limits = Limits.from_settings(settings)
        roots = settings.allowed_roots
        self.roots = [Path(root).resolve() for root in roots] if roots is not None else None
        self._fetcher = fetcher
        self._lock = threading.Lock()

    @property
    def fetcher(self) -> Fetcher:
        from imgembed.intake.fetch import Fetcher, allow_all, is_public  # httpx: only for URLs

        with self._lock:
            if self._fetcher is None:
                s = self.settings
                self._fetcher = Fetcher(
                    max_bytes=s.max_file_size,
                    timeout=s.fetch_timeout,
                    deadline=s.fetch_deadline,
                    attempts=s.retry_attempts,
                    retry_delay=s.retry_delay,
                    max_connections=s.max_concurrent_fetches,
                    address_allowed=allow_all if s.allow_private_urls else is_public,
                )
            return self._fetcher

    def read(self, source: Input) -> ImageInput:
        label = describe(source)
        if isinstance(source, Image.Image):
            header = f"{source.mode}:{source.size}:".encode()
            return ImageInput(label, content_hash(header + source.tobytes()), image=source)
        max_size = self.settings.max_file_size
        if isinstance(source, bytes | bytearray | memoryview):
            data = check_size(bytes(source), max_size, label)
        elif is_url(source):
            data = self.fetcher.fetch(str(source))
        elif is_data_uri(source):
            data = decode_base64(str(source), max_size, label)
        elif not isinstance(source, str | os.PathLike):
            raise InvalidSourceError(
                f"not an image source: {source!r:.40} (a path, URL, "
                "data URI, bytes or PIL image is)",
                label,
            )
        else:
            deadline = self.settings.fetch_deadline or self.settings.fetch_timeout
            data = read_file(as_path(source), max_size, self.roots, deadline)
        return ImageInput(label, content_hash(data), data=data)

    def quality(self, decoded: Decoded) -> dict[str, Any]:
        original = (decoded.metadata["width"], decoded.metadata["height"])
        return self.flag(assess(decoded.image, original))

    def flag(self, scores: dict[str, Any]) -> dict[str, Any]:
        """Scores plus `low_quality` under the current threshold."""
        return {**scores, "low_quality": scores["confidence"] < self.settings.quality_threshold}

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()
