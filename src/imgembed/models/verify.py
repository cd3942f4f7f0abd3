"""Checks a runtime + precision against the reference (open_clip on torch, fp32) on the
user's own images: how close the vectors are and how much faster it runs."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imgembed.config import Settings
from imgembed.engine.similarity import l2_normalize
from imgembed.errors import ConfigurationError, ImgEmbedError
from imgembed.intake.image_input import Intake
from imgembed.models import auto
from imgembed.models.registry import ModelRef
from imgembed.models.runtime import Encoder, create_encoder

PROMPTS = (
    "a photo of a dog",
    "a red dress on a white background",
    "two people walking on a beach at sunset",
    "close-up of a circuit board",
    "ein Fahrrad vor einer Backsteinmauer",
    "een kopje koffie op een houten tafel",
    "a blurry night photo of a city street with neon signs",
    "product shot: running shoes, side view",
)


@dataclass
class VerifyReport:
    model: str
    runtime: str
    precision: str
    batch_size: int
    images: int
    image_cosine_min: float
    image_cosine_mean: float
    text_cosine_min: float | None
    text_cosine_mean: float | None
    images_per_second: float
    reference_images_per_second: float
    failed: list[str] = field(default_factory=list)

    @property
    def speed_ratio(self) -> float:
        return self.images_per_second / self.reference_images_per_second


def default_min_cosine(precision: str) -> float:
    """The image cosine to the reference a runtime must reach: int8 trades a little
    exactness for speed; every other precision must match."""
    return 0.99 if precision == "int8" else 0.9999


def reference_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"runtime": "torch", "precision": "fp32", "device": "cpu"})


def verify(ref: ModelRef, settings: Settings, images: Sequence[Path | bytes]) -> VerifyReport:
    settings = auto.resolve(settings, ref)  # the report names what ran
    reference = create_encoder(ref, reference_settings(settings))
    candidate = create_encoder(ref, settings)
    intake = Intake(settings)
    pixels, failed = [], []
    for source in images:
        try:  # full decode (no draft): both runtimes see the same pixels
            decoded = intake.read(source).decode(intake.limits, None)
            pixels.append(reference.preprocessor(decoded.image))
        except ImgEmbedError as exc:  # names its source
            failed.append(str(exc))
        except Exception as exc:  # untrusted files: as in the pipeline, skip and name them
            failed.append(f"{source if isinstance(source, Path | str) else 'bytes'}: {exc!r}")
    if not pixels:
        why = f": {'; '.join(failed[:3])}" if failed else " (none given)"
        raise ConfigurationError(f"no image could be read to verify with{why}")
    batch = np.stack(pixels)
    size = settings.batch_size
    (ours, ours_rate), (theirs, theirs_rate) = _encode_timed([candidate, reference], batch, size)
    image_cos = np.sum(l2_normalize(ours) * l2_normalize(theirs), axis=1)
    text_cos = None
    with contextlib.suppress(ImgEmbedError):  # image-only models and exports have no text
        text_cos = np.sum(
            l2_normalize(candidate.encode_texts(PROMPTS))
            * l2_normalize(reference.encode_texts(PROMPTS)),
            axis=1,
        )
    return VerifyReport(
        model=str(ref),
        runtime=settings.runtime,
        precision=settings.precision,
        batch_size=size,
        images=len(pixels),
        image_cosine_min=float(image_cos.min()),
        image_cosine_mean=float(image_cos.mean()),
        text_cosine_min=None if text_cos is None else float(text_cos.min()),
        text_cosine_mean=None if text_cos is None else float(text_cos.mean()),
        images_per_second=ours_rate,
        reference_images_per_second=theirs_rate,
        failed=failed,
    )


def _encode_timed(
    encoders: list[Encoder], batch: np.ndarray, size: int
) -> list[tuple[np.ndarray, float]]:
    """Each encoder's output and images/s: the best of at least 3 rounds taken in turns (more,
    up to 20, until 1 s has passed), so that one slow moment of a busy machine does not decide
    the ratio (a single round swung 0.6x-77x)."""
    for encoder in encoders:
        encoder.encode_images(batch[:size])  # warm-up: first runs allocate and plan
    outputs: list[np.ndarray] = [np.empty(0)] * len(encoders)
    best = [float("inf")] * len(encoders)
    begun, rounds = time.perf_counter(), 0
    while rounds < 3 or (rounds < 20 and time.perf_counter() - begun < 1.0):
        rounds += 1
        for n, encoder in enumerate(encoders):
            started = time.perf_counter()
            outputs[n] = np.concatenate(
                [encoder.encode_images(batch[i : i + size]) for i in range(0, len(batch), size)]
            )
            best[n] = min(best[n], time.perf_counter() - started)
    return [(out, len(batch) / seconds) for out, seconds in zip(outputs, best, strict=True)]


def synthetic_images(count: int) -> list[bytes]:
    """Deterministic PNGs with smooth regions, edges and noise, for a check without photos."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        y, x = np.mgrid[0:256, 0:320] / 256.0
        base = np.stack([np.sin(x * (i + 1)), np.cos(y * (i + 2)), x * y], axis=-1)
        noisy = base * 0.5 + 0.5 + rng.normal(0, 0.05 * (i % 4), base.shape)
        pixels = (np.clip(noisy, 0, 1) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out
