"""Fusion of a product's image and text embeddings, exactly.

A product's combined vector is the weighted concatenation of its two unit vectors,
`[w_img * img ; w_txt * txt]`, with the weights of its own category. A query is the plain
concatenation of its two unit parts, `[q_img ; q_txt]` (q_img from the image model: its CLIP
text tower for a text query, or the query image). Their inner product is

    w_img * cos(img, q_img) + w_txt * cos(txt, q_txt)

for every product with its own weights, so one inner-product ANN query ranks by exactly that.
The two parts come from different models and live in different spaces: they are never
averaged or padded into one. A product without an image has a zero image part, so its score
is `w_txt * cos_txt` (cos_img counted as 0) and it is flagged as text-only."""

from __future__ import annotations

import numpy as np

from imgembed.catalog.weights import Weights
from imgembed.errors import ConfigurationError


def unit(vector: object, what: str) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(array))
    if array.size == 0 or not np.isfinite(norm) or norm == 0:
        raise ConfigurationError(f"{what}: cannot normalise an empty, zero or non-finite vector")
    return array / norm


class WidthError(ConfigurationError):
    """A part of another width than its model's (`part`: image or text)."""

    def __init__(self, message: str, part: str):
        super().__init__(message)
        self.part = part


def fuse(
    image: object | None,
    text: object,
    weights: Weights,
    image_dimension: int,
    text_dimension: int,
) -> np.ndarray:
    """The combined vector `[w_img * img ; w_txt * txt]`; no image gives a zero image part."""
    if image is None:
        image_part = np.zeros(image_dimension)
    else:
        image_part = weights.image * _sized(image, image_dimension, "image")
    text_part = weights.text * _sized(text, text_dimension, "text")
    return np.concatenate([image_part, text_part]).astype(np.float32)


def _sized(part: object, dimension: int, what: str) -> np.ndarray:
    # a part of the wrong width would shift the other part and score against the wrong model
    vector = unit(part, f"{what} embedding")
    if vector.shape != (dimension,):
        raise WidthError(
            f"{what} embedding has {vector.shape[0]} dimensions, expected {dimension}", what
        )
    return vector


def query(image_part: object, text_part: object) -> np.ndarray:
    """The query `[q_img ; q_txt]`, each part unit length."""
    return np.concatenate(
        [unit(image_part, "query image part"), unit(text_part, "query text part")]
    ).astype(np.float32)


def score(weights: Weights, cos_image: float | None, cos_text: float) -> float:
    """What the inner product of a combined vector with a query equals."""
    return weights.image * (cos_image or 0.0) + weights.text * cos_text
