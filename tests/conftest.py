"""Shared fixtures. Tests never reach the internet: the Hugging Face hub is switched off
before anything imports it, and models are the tiny seeded CLIP or random-weight checkpoints."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest

TESTDATA = Path(__file__).resolve().parent.parent / ".testdata"
TINY = {"model": "imgembed-tiny", "pretrained": "seed:0"}


def _files(folder: str) -> list[Path]:
    files = sorted((TESTDATA / folder).glob("*"))
    if not files:
        pytest.fail(f"no test images in {TESTDATA / folder}: run scripts/setup.sh first")
    return files


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """Real CC0/public-domain photos of a few hundred pixels (scikit-image)."""
    return _files("photos")


@pytest.fixture(scope="session")
def large_jpegs() -> list[Path]:
    """Real 3640x2400 and larger JPEGs (Debian ukui-wallpapers): draft decoding applies."""
    return _files("large")


@pytest.fixture(scope="session")
def all_photos(photos, large_jpegs) -> list[Path]:
    return photos + large_jpegs


@pytest.fixture(scope="session")
def _pgdata_template(tmp_path_factory) -> Path:
    """One initdb for the session: each test's embedded server starts from a copy of it."""
    from imgembed.store import embedded

    folder = tmp_path_factory.mktemp("pgdata-template")
    embedded.start(folder)
    embedded.stop(folder)
    return embedded.pgdata(folder)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch, _pgdata_template):
    """Each test gets its own data directory and no IMGEMBED_/CLIP_ settings from outside."""
    for key in list(os.environ):
        if key.startswith(("IMGEMBED_", "CLIP_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("IMGEMBED_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMGEMBED_PGDATA_TEMPLATE", str(_pgdata_template))


@pytest.fixture
def tiny_service():
    from imgembed import ImageEmbeddingService

    with ImageEmbeddingService(**TINY) as service:
        yield service


@pytest.fixture(scope="session")
def vitb32_checkpoint(tmp_path_factory) -> Path:
    """The full ViT-B-32 architecture with seeded random weights, saved as a checkpoint."""
    import open_clip
    import torch

    torch.manual_seed(1234)
    model = open_clip.create_model("ViT-B-32")
    path = tmp_path_factory.mktemp("ckpt") / "vit-b-32-random.pt"
    torch.save(model.state_dict(), path)
    return path
