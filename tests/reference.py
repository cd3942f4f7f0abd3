"""open_clip's own pipeline, the reference every runtime must match."""

import numpy as np
import open_clip
import torch
from PIL import Image


def reference_model(name: str, pretrained: str | None):
    """open_clip model + inference transform, loaded exactly as open_clip documents."""
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    return model.eval(), preprocess


def reference_image_embeddings(model, preprocess, paths) -> np.ndarray:
    with torch.no_grad():
        batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        return torch.nn.functional.normalize(model.encode_image(batch), dim=-1).numpy()


def reference_text_embeddings(model, name: str, texts) -> np.ndarray:
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1).numpy()


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)
