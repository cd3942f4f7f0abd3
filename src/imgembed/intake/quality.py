"""A simple image quality signal (the seed's `confidence` / `quality_threshold`).

Measured on a greyscale copy whose longer side is at most 256 px:
- contrast: standard deviation of the grey levels; near-uniform images (blank, single
  colour, badly over- or under-exposed) score low: contrast / 20, capped at 1;
- sharpness: variance of the 4-neighbour Laplacian; blurred images score low: var / 50;
- size: shorter side of the original / 224 (the usual model input), capped at 1.
`confidence` is the lowest of the three, in [0, 1]; under the threshold the image is flagged.
A heuristic for flagging, not a verdict: such images are embedded all the same."""

from __future__ import annotations

import numpy as np
from PIL import Image

SIDE = 256


def assess(image: Image.Image, original_size: tuple[int, int]) -> dict[str, float]:
    """Scores in [0, 1]; the caller flags `low_quality` against its threshold."""
    grey = image.convert("L")
    grey.thumbnail((SIDE, SIDE), Image.Resampling.BILINEAR)
    pixels = np.asarray(grey, dtype=np.float32)
    contrast = float(pixels.std())
    if min(pixels.shape) >= 3:
        core = pixels[1:-1, 1:-1]
        laplacian = (
            4 * core - pixels[:-2, 1:-1] - pixels[2:, 1:-1] - pixels[1:-1, :-2] - pixels[1:-1, 2:]
        )
        sharpness = float(laplacian.var())
    else:
        sharpness = 0.0
    scores = {
        "contrast": min(1.0, contrast / 20),
        "sharpness": min(1.0, sharpness / 50),
        "size": min(1.0, min(original_size) / 224),
    }
    return {
        "confidence": round(min(scores.values()), 4),
        **{name: round(score, 4) for name, score in scores.items()},
    }
