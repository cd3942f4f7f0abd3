"""The model's own image transform, reproduced with Pillow and NumPy (no torch), so every
runtime preprocesses exactly like open_clip's `preprocess`:

    resize (shortest | longest | squash, PIL bicubic/bilinear) -> centre crop (or pad)
    -> RGB -> float32 / 255 -> (x - mean) / std, channels first.

Built from the preprocess config open_clip attaches to the model, never from global constants.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width), as open_clip reads its `size`."""
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


@dataclass(frozen=True)
class Preprocessor:
    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Preprocessor:
        mean, std = cfg["mean"], cfg["std"]
        return cls(
            size=_pair(cfg["size"]),
            mean=tuple(float(m) for m in (mean if isinstance(mean, list | tuple) else [mean] * 3)),
            std=tuple(float(s) for s in (std if isinstance(std, list | tuple) else [std] * 3)),
            interpolation=cfg.get("interpolation", "bicubic"),
            resize_mode=cfg.get("resize_mode", "shortest"),
            fill_color=int(cfg.get("fill_color", 0)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": self.fill_color,
        }

    @property
    def min_side(self) -> int:
        return min(self.size)

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """The geometric part: the model-sized RGB image the network sees."""
        height, width = self.size
        if self.resize_mode == "squash":
            image = self._resize(image, (width, height))
        elif self.resize_mode == "longest":
            image = self._resize(image, self._keep_ratio_size(image, longest=True))
            image = self._center_crop_or_pad(image)
        else:
            image = self._resize(image, self._shortest_size(image))
            image = self._center_crop_or_pad(image)
        return image if image.mode == "RGB" else image.convert("RGB")

    def to_array(self, image: Image.Image) -> np.ndarray:
        """Normalised float32 array, shape (3, H, W), from a model-sized RGB image: each
        channel looked up in a table of its 256 values, written straight into its plane (the
        same float32 numbers as computing (x / 255 - mean) / std per pixel, 4x faster)."""
        pixels = np.asarray(image)
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for channel, table in enumerate(self._levels):
            np.take(table, pixels[..., channel], out=out[channel])
        return out

    @functools.cached_property
    def _levels(self) -> np.ndarray:
        """(3, 256): the normalised value of every 8-bit level, per channel."""
        levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255)
        levels = levels - np.asarray(self.mean, dtype=np.float32)
        return (levels / np.asarray(self.std, dtype=np.float32)).T.copy()

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.to_array(self.resize_and_crop(image))

    def _resize(self, image: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
        if image.size == size_wh:  # torchvision skips the resample in this case too
            return image
        return image.resize(size_wh, _RESAMPLE.get(self.interpolation, Image.Resampling.BICUBIC))

    def _shortest_size(self, image: Image.Image) -> tuple[int, int]:
        height, width = self.size
        if height != width:
            return self._keep_ratio_size(image, longest=False)
        # torchvision Resize(int): short side to `size`, long side truncated.
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = height, int(height * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)

    def _keep_ratio_size(self, image: Image.Image, longest: bool) -> tuple[int, int]:
        # open_clip's ResizeKeepRatio (from timm), deterministic inference branch.
        w, h = image.size
        target_h, target_w = self.size
        ratio_h, ratio_w = h / target_h, w / target_w
        ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
        return round(w / ratio), round(h / ratio)

    def _center_crop_or_pad(self, image: Image.Image) -> Image.Image:
        crop_h, crop_w = self.size
        w, h = image.size
        if crop_w > w or crop_h > h:
            padded = Image.new(image.mode, (max(w, crop_w), max(h, crop_h)), self._fill(image))
            padded.paste(image, (max(crop_w - w, 0) // 2, max(crop_h - h, 0) // 2))
            image, (w, h) = padded, padded.size
        top = round((h - crop_h) / 2.0)
        left = round((w - crop_w) / 2.0)
        if (left, top, w, h) == (0, 0, crop_w, crop_h):
            return image
        return image.crop((left, top, left + crop_w, top + crop_h))

    def _fill(self, image: Image.Image) -> int | tuple[int, ...]:
        bands = len(image.getbands())
        return self.fill_color if bands == 1 else (self.fill_color,) * bands
