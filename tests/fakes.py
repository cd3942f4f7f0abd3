"""A fake encoder for batching and fault tests: it wraps a real encoder (so vectors stay the
library's own), records every batch, and can be slowed down, poisoned, failed or killed; and
`until`, the poll with a deadline that tests waiting on it use."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
from PIL import Image

from imgembed.errors import EncodeError


class WorkerDeath(BaseException):
    """Escapes every `except Exception`: what a dying encoder worker looks like."""


def solid_png(colour=(255, 0, 255), size=64) -> bytes:
    """A valid image that the fake encoder refuses in any batch (photos are never solid)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def is_poison(pixels: np.ndarray) -> bool:
    return float(np.ptp(pixels.reshape(pixels.shape[0], -1), axis=1).max()) < 1e-6


class FakeEncoder:
    def __init__(self, inner, delay: float = 0.0):
        self.inner = inner
        self.ref = inner.ref
        self.dimension = inner.dimension
        self.preprocessor = inner.preprocessor
        self.fingerprint = inner.fingerprint
        self.delay = delay  # seconds per call, like a model's fixed cost per forward pass
        self.fail = False  # every batch raises EncodeError
        self.die = False  # every batch kills the worker
        self.gate: threading.Event | None = None  # if set, image batches wait for it
        self.image_batches: list[int] = []
        self.failed_batches: list[int] = []
        self.text_batches: list[int] = []
        self._lock = threading.Lock()

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.image_batches.append(len(batch))
        if self.gate is not None:
            self.gate.wait(timeout=30)
        time.sleep(self.delay)
        if self.die:
            raise WorkerDeath("the encoder thread was killed")
        if self.fail or any(is_poison(image) for image in batch):
            with self._lock:
                self.failed_batches.append(len(batch))
            raise EncodeError(f"fake encoder: refused a batch of {len(batch)}")
        return self.inner.encode_images(batch)

    def encode_texts(self, texts):
        with self._lock:
            self.text_batches.append(len(texts))
        time.sleep(self.delay)
        if self.die:
            raise WorkerDeath("the encoder thread was killed")
        if self.fail or any(text == "poison" for text in texts):
            raise RuntimeError(f"fake encoder: refused {len(texts)} texts")
        return self.inner.encode_texts(texts)

    def count_tokens(self, texts):
        return self.inner.count_tokens(texts)


async def until(condition, what: str, seconds: float = 60) -> None:
    """Polls; the limit only stops a broken run from hanging (not a timing assert)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        await asyncio.sleep(0.01)
