"""One input image, read once: from a path, raw bytes, or a PIL image already in memory."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from imgembed.errors import ImageTooLargeError
from imgembed.intake.decode import Decoded, decode, image_metadata, read_metadata, to_rgb
from imgembed.intake.sources import Source, describe, read_bytes


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ImageInput:
    label: str
    digest: str  # SHA-256 of the file's bytes (of mode, size and pixels for a PIL image)
    data: bytes | None = None
    image: Image.Image | None = None

    @classmethod
    def read(cls, source: Source | Image.Image, max_file_size: int) -> ImageInput:
        if isinstance(source, Image.Image):
            header = f"{source.mode}:{source.size}:".encode()
            return cls(describe(source), content_hash(header + source.tobytes()), image=source)
        data = read_bytes(source, max_file_size)
        return cls(describe(source), content_hash(data), data=data)

    def metadata(self) -> dict[str, Any]:
        if self.image is not None:
            return image_metadata(self.image, None)
        assert self.data is not None
        return read_metadata(self.data, self.label)

    def decode(self, max_pixels: int, draft_min_side: int | None = None) -> Decoded:
        if self.data is not None:
            return decode(
                self.data, self.label, max_pixels=max_pixels, draft_min_side=draft_min_side
            )
        assert self.image is not None
        if self.image.width * self.image.height > max_pixels:
            raise ImageTooLargeError(
                f"{self.image.width}x{self.image.height} pixels, over the limit of "
                f"{max_pixels:,} (max_image_pixels)",
                self.label,
            )
        return Decoded(to_rgb(ImageOps.exif_transpose(self.image)), self.metadata())
