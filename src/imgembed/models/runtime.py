"""Runtimes turn preprocessed image batches and texts into raw (unnormalised) embeddings.
Every runtime has the same interface; the engine never knows which one it drives."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from imgembed.config import Settings
from imgembed.errors import ConfigurationError, EncodeError
from imgembed.models import auto, registry
from imgembed.models.preprocess import Preprocessor
from imgembed.models.registry import ModelRef


class Encoder(Protocol):
    ref: ModelRef
    dimension: int
    preprocessor: Preprocessor
    fingerprint: str  # identifies weights + runtime + precision

    def encode_images(self, batch: np.ndarray) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


class TorchEncoder:
    """open_clip's model on torch: the reference runtime."""

    def __init__(self, ref: ModelRef, settings: Settings):
        from imgembed.models.loader import load_model

        self._loaded = load_model(
            ref, settings.device, settings.precision, settings.model_cache_dir
        )
        self.ref = ref
        self.dimension = self._loaded.dimension
        self.preprocessor = Preprocessor.from_config(self._loaded.preprocess_cfg)
        self.fingerprint = f"torch/{settings.precision}/{self._loaded.weights_id}"
        self._lock = threading.Lock()  # one forward pass at a time: each uses every core
        # Like OpenAI's CLIP: images enter in the dtype of the first conv (fp16/bf16 keep some
        # layers in fp32, so "the model's dtype" is not one thing).
        visual = self._loaded.model.visual
        first = getattr(getattr(visual, "conv1", None), "weight", None)
        self._input_dtype = (first if first is not None else next(visual.parameters())).dtype

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        import torch

        try:
            with self._lock, torch.inference_mode():
                pixels = torch.from_numpy(batch).to(self._loaded.device, self._input_dtype)
                return self._loaded.model.encode_image(pixels).float().cpu().numpy()
        except RuntimeError as exc:
            raise EncodeError(f"{self.ref}: image encoding failed: {exc}") from exc

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        try:
            with self._lock, torch.inference_mode():
                tokens = self._loaded.tokenizer(list(texts)).to(self._loaded.device)
                return self._loaded.model.encode_text(tokens).float().cpu().numpy()
        except RuntimeError as exc:
            raise EncodeError(f"{self.ref}: text encoding failed: {exc}") from exc

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        from imgembed.models.tokenizer import token_counts  # `tokenizers`: only when asked

        tokenizer = self._loaded.tokenizer
        ids = tokenizer(list(texts)).numpy()
        # open_clip's HFTokenizer (hf-hub: models) has no end id; it pads with its own
        pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None) or 0
        return token_counts(ids, getattr(tokenizer, "eot_token_id", None), pad)


def create_encoder(ref: ModelRef, settings: Settings) -> Encoder:
    settings = auto.resolve(settings, ref)
    family = registry.facts(ref.name).family
    if settings.runtime == "onnx" and family != "open_clip":  # before "exporting ..." is said
        raise ConfigurationError(
            f"{ref.name} runs on the torch runtime only: leave out --runtime onnx "
            "(IMGEMBED_RUNTIME)"
        )
    if settings.runtime == "onnx":
        from imgembed.models.onnx_runtime import OnnxEncoder

        return OnnxEncoder(ref, settings)
    if family == "efficientnet":
        from imgembed.models.efficientnet import EfficientNetEncoder

        return EfficientNetEncoder(ref, settings)
    return TorchEncoder(ref, settings)
