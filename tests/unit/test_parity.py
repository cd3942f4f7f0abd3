"""Exactness: our embeddings equal open_clip's preprocess + encode for the same weights."""

import numpy as np
import pytest
import torch
from PIL import Image

from imgembed import ImageEmbeddingService
from imgembed.intake.decode import Limits, decode
from tests.conftest import TINY
from tests.reference import (
    reference_image_embeddings,
    reference_model,
    reference_text_embeddings,
    rowwise_cosine,
)

TEXTS = ["a photo of a cat", "a red bicycle", "Ein rotes Auto auf einer Straße", ""]


@pytest.fixture(scope="module")
def tiny_reference():
    from imgembed.models import registry

    registry.open_clip()  # registers the tiny config with open_clip (importing does not)

    torch.manual_seed(0)  # what pretrained="seed:0" means
    return reference_model("imgembed-tiny", None)


def _ours(paths, exact, **settings):
    with ImageEmbeddingService(exact=exact, cache_embeddings=False, **settings) as service:
        results = service.embed_images(paths)
    assert all(r.ok for r in results), [str(r.error) for r in results if r.error]
    return np.stack([r.embedding for r in results])


@pytest.mark.parametrize(("exact", "bound"), [(True, 0.99999), (False, 0.9999)])
def test_tiny_model_images(tiny_reference, all_photos, exact, bound):
    expected = reference_image_embeddings(*tiny_reference, all_photos)
    cosines = rowwise_cosine(_ours(all_photos, exact, **TINY), expected)
    assert cosines.min() >= bound, dict(zip([p.name for p in all_photos], cosines, strict=True))


@pytest.fixture(scope="module")
def large_pngs(large_jpegs, tmp_path_factory) -> list:
    """Large photos as RGB and (opaque) RGBA PNGs: reduced by a box filter before conversion
    outside exact mode, as JPEGs are drafted."""
    folder = tmp_path_factory.mktemp("large-png")
    paths = []
    for jpeg in large_jpegs[:2]:
        with Image.open(jpeg) as image:
            rgb = image.convert("RGB").resize((2000, 2000 * image.height // image.width))
        for mode in ("RGB", "RGBA"):
            path = folder / f"{jpeg.stem}-{mode}.png"
            rgb.convert(mode).save(path, compress_level=1)
            paths.append(path)
    return paths


def test_large_pngs_are_reduced_within_the_draft_bound(tiny_reference, large_pngs):
    drafted = decode(large_pngs[0].read_bytes(), "x", Limits(), draft_min_side=448).image
    assert drafted.size == (1000, 625)  # 2000x1250 reduced by 2: the short side stays >= 448
    expected = reference_image_embeddings(*tiny_reference, large_pngs)
    assert rowwise_cosine(_ours(large_pngs, True, **TINY), expected).min() >= 0.99999
    assert rowwise_cosine(_ours(large_pngs, False, **TINY), expected).min() >= 0.9999


def test_tiny_model_texts(tiny_reference, tiny_service):
    expected = reference_text_embeddings(tiny_reference[0], "imgembed-tiny", TEXTS)
    assert rowwise_cosine(tiny_service.embed_texts(TEXTS), expected).min() >= 0.99999


def test_tiny_model_is_deterministic_golden(tiny_service):
    """Golden values of the seeded tiny model: they must not drift between versions."""
    image = np.zeros((240, 320, 3), dtype=np.uint8)
    image[..., 0] = (np.arange(320) * 255 // 319)[None, :]
    image[..., 1] = (np.arange(240) * 255 // 239)[:, None]
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    vector = tiny_service.embed_image(buffer.getvalue())
    text = tiny_service.embed_text("a red bicycle")
    np.testing.assert_allclose(vector[:4], GOLDEN_IMAGE, atol=1e-5)
    np.testing.assert_allclose(text[:4], GOLDEN_TEXT, atol=1e-5)


# Recorded with torch 2.14.1 / open_clip 3.3.0 on CPU.
GOLDEN_IMAGE = [-0.195752, -0.192441, -0.13248, -0.142229]
GOLDEN_TEXT = [-0.108655, 0.180323, -0.061484, 0.182735]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_vit_b_32_checkpoint(vitb32_checkpoint, all_photos, large_pngs, suffix, tmp_path):
    all_photos = all_photos + large_pngs
    checkpoint = vitb32_checkpoint
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        checkpoint = tmp_path / "vit-b-32-random.safetensors"
        save_file(torch.load(vitb32_checkpoint, weights_only=True), checkpoint)
    model, preprocess = reference_model("ViT-B-32", str(checkpoint))
    expected = reference_image_embeddings(model, preprocess, all_photos)
    settings = {"model": "ViT-B-32", "pretrained": str(checkpoint)}
    assert rowwise_cosine(_ours(all_photos, True, **settings), expected).min() >= 0.99999
    assert rowwise_cosine(_ours(all_photos, False, **settings), expected).min() >= 0.9999
    with ImageEmbeddingService(**settings) as service:
        assert service.dimension == 512
        texts = service.embed_texts(TEXTS)
    expected_texts = reference_text_embeddings(model, "ViT-B-32", TEXTS)
    assert rowwise_cosine(texts, expected_texts).min() >= 0.99999
