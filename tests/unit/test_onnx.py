"""The ONNX runtime: equal to open_clip on torch (fp32), close in int8, exported once and
reused, re-exported when the weights change, and runnable without torch."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from imgembed import ConfigurationError, ImageEmbeddingService, ModelUnavailableError
from imgembed.models import onnx_manifest, onnx_runtime, registry
from imgembed.models.tokenizer import TextTokenizer
from tests.conftest import TINY
from tests.reference import (
    reference_image_embeddings,
    reference_model,
    reference_text_embeddings,
    rowwise_cosine,
)

TEXTS = [
    "a photo of a cat",
    "A RED   Bicycle!!\tleaning on a wall",
    "Ein rotes Auto auf einer Straße, 1999",
    "een kopje koffie op een houten tafel",
    "日本語のテキスト 中文 测试",
    "emoji 🐱🚀 and café naïve résumé",
    "it's we're they've I'm you'll he'd",
    "&amp;lt;b&amp;gt; html entities, mojibake Ã©tÃ©",
    "numbers 12345 3.14 and C++ & C# vs. Rust's traits",
    "",
    "word " * 100,  # longer than the context: cut, end token kept
    "<end_of_text> inside",
]
NO_TORCH = str(Path(__file__).resolve().parents[1] / "no_torch.py")


def _embed(paths, **settings):
    with ImageEmbeddingService(exact=True, cache_embeddings=False, **settings) as service:
        results = service.embed_images(paths)
        texts = service.embed_texts(TEXTS)
    assert all(r.ok for r in results), [str(r.error) for r in results if r.error]
    return np.stack([r.embedding for r in results]), np.asarray(texts)


@pytest.fixture(scope="module")
def tiny_reference():
    registry.open_clip()  # registers the tiny config
    torch.manual_seed(0)
    return reference_model("imgembed-tiny", None)


def test_tokenizer_ids_equal_open_clip():
    reference = open_clip.get_tokenizer("ViT-B-32")
    ours = TextTokenizer.from_open_clip(reference)
    np.testing.assert_array_equal(ours(TEXTS), reference(TEXTS).numpy())
    assert ours(["word " * 100])[0, -1] == ours.spec.eot


def test_tokenizer_survives_save_and_load(tmp_path):
    ours = TextTokenizer.from_open_clip(open_clip.get_tokenizer("ViT-B-32"))
    loaded = TextTokenizer.load(tmp_path, ours.save(tmp_path))
    np.testing.assert_array_equal(loaded(TEXTS), ours(TEXTS))


def test_tiny_fp32_equals_open_clip(tiny_reference, all_photos):
    images, texts = _embed(all_photos, runtime="onnx", **TINY)
    expected = reference_image_embeddings(*tiny_reference, all_photos)
    assert rowwise_cosine(images, expected).min() >= 0.99999
    expected_texts = reference_text_embeddings(tiny_reference[0], "imgembed-tiny", TEXTS)
    assert rowwise_cosine(texts, expected_texts).min() >= 0.99999


def test_tiny_int8_stays_close(tiny_reference, all_photos):
    """Measured 0.99988 (images) and 0.9988 (texts) at the minimum; 0.990 and 0.987 before
    the weights were limited to 7 bits (see onnx_export._quantize)."""
    images, texts = _embed(all_photos, runtime="onnx", precision="int8", **TINY)
    expected = reference_image_embeddings(*tiny_reference, all_photos)
    image_cos = rowwise_cosine(images, expected)
    assert 0.999 <= image_cos.min() < 0.99999  # close, and really quantised
    expected_texts = reference_text_embeddings(tiny_reference[0], "imgembed-tiny", TEXTS)
    assert rowwise_cosine(texts, expected_texts).min() >= 0.998


@pytest.fixture(scope="module")
def vitb32_exports(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-models")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "image_bound", "text_bound"), [("fp32", 0.99999, 0.99999), ("int8", 0.999, 0.998)]
)
def test_vit_b_32_equals_open_clip(
    vitb32_checkpoint, vitb32_exports, all_photos, precision, image_bound, text_bound
):
    """fp32 is exact; int8 (the issue's bound is 0.99) measured 0.9997 on the photos and
    0.9984 on the texts with these random weights (real ones cannot be fetched offline:
    `imgembed models verify` checks them)."""
    model, preprocess = reference_model("ViT-B-32", str(vitb32_checkpoint))
    settings = {"model": "ViT-B-32", "pretrained": str(vitb32_checkpoint)}
    images, texts = _embed(
        all_photos, runtime="onnx", precision=precision, model_cache_dir=vitb32_exports, **settings
    )
    assert (
        rowwise_cosine(images, reference_image_embeddings(model, preprocess, all_photos)).min()
        >= image_bound
    )
    expected_texts = reference_text_embeddings(model, "ViT-B-32", TEXTS)
    assert rowwise_cosine(texts, expected_texts).min() >= text_bound


@pytest.fixture
def tiny_checkpoint(tmp_path):
    registry.open_clip()
    torch.manual_seed(5)
    path = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("imgembed-tiny").state_dict(), path)
    return path


def _exports(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "exporting to ONNX" in r.getMessage()]


def test_export_is_reused_and_redone_when_the_source_changes(tiny_checkpoint, photos, caplog):
    caplog.set_level(logging.WARNING, logger="imgembed.models.onnx_runtime")
    settings = {"model": "imgembed-tiny", "pretrained": str(tiny_checkpoint), "runtime": "onnx"}

    def first_vector():
        onnx_runtime._SESSIONS.clear()  # as a fresh process would
        with ImageEmbeddingService(cache_embeddings=False, **settings) as service:
            vector = service.embed_image(photos[0])
            return vector, service.encoder.folder

    before, folder = first_vector()
    assert len(_exports(caplog)) == 1 and "not exported yet" in _exports(caplog)[0]
    manifest = json.loads((folder / onnx_manifest.MANIFEST).read_text())
    assert manifest["weights"] == registry.weights_id(
        registry.ModelRef("imgembed-tiny", str(tiny_checkpoint))
    )
    assert manifest["opset"] == 17 and manifest["precision"] == "fp32"
    assert set(manifest["files"]) == {"visual.onnx", "text.onnx", "tokenizer.json"}
    assert manifest["preprocess"]["size"] == [224, 224]

    again, _ = first_vector()
    assert len(_exports(caplog)) == 1  # reused
    np.testing.assert_array_equal(again, before)

    registry.open_clip()
    torch.manual_seed(6)  # new weights in the same file
    torch.save(open_clip.create_model("imgembed-tiny").state_dict(), tiny_checkpoint)
    changed, _ = first_vector()
    assert len(_exports(caplog)) == 2 and "weights changed" in _exports(caplog)[1]
    assert rowwise_cosine(changed[None], before[None])[0] < 0.99

    (folder / "visual.onnx").write_bytes(b"truncated")
    first_vector()
    assert len(_exports(caplog)) == 3 and "visual.onnx is missing or damaged" in _exports(caplog)[2]

    manifest = json.loads((folder / onnx_manifest.MANIFEST).read_text())
    (folder / onnx_manifest.MANIFEST).write_text(json.dumps({**manifest, "format": 0}))
    first_vector()
    assert "another version of imgembed" in _exports(caplog)[3]


def _no_torch(*args):
    return subprocess.run(
        [sys.executable, NO_TORCH, *args],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=300,
    )


def test_onnx_runs_where_torch_cannot_be_imported(photos, tmp_path):
    args = [
        "--runtime",
        "onnx",
        "--precision",
        "int8",
        "--model",
        "imgembed-tiny",
        "--pretrained",
        "seed:0",
    ]
    missing = _no_torch("embed", str(photos[0]), *args)
    assert missing.returncode == 4, missing.stderr
    assert (
        "no usable ONNX export (int8)" in missing.stderr
        and "imgembed models export" in missing.stderr
    )

    exported = subprocess.run(
        [
            Path(sys.executable).with_name("imgembed"),
            "models",
            "export",
            "imgembed-tiny",
            "--pretrained",
            "seed:0",
            "--precision",
            "int8",
        ],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr
    out = tmp_path / "out.npy"
    images = _no_torch("embed", *map(str, photos), "-o", str(out), *args)
    assert images.returncode == 0, images.stderr  # 97 would mean torch was imported
    assert np.load(out).shape == (len(photos), 64)
    texts = _no_torch("embed-text", "a red bicycle", *args)
    assert texts.returncode == 0, texts.stderr
    assert len(json.loads(texts.stdout)["embedding"]) == 64


def test_missing_export_without_torch_is_a_typed_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "imgembed.models.onnx_export", None)  # import fails
    with pytest.raises(ModelUnavailableError, match="Exporting needs torch"):
        ImageEmbeddingService(runtime="onnx", **TINY).encoder  # noqa: B018


def test_a_model_torch_cannot_export_is_a_typed_error(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::weird' is not supported")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(ConfigurationError, match=r"cannot be exported to ONNX.*aten::weird"):
        ImageEmbeddingService(runtime="onnx", **TINY).encoder  # noqa: B018
    assert not list(ImageEmbeddingService(**TINY).settings.onnx_dir.glob("*/*"))  # no leftovers


def test_a_disk_too_full_for_the_export_is_a_typed_error_before_writing(monkeypatch):
    """A full disk cut the shape-inferred copy of a tower in CI, and the quantiser then
    failed with 'Wire format was corrupt'; now the export says what it needs."""
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    service = ImageEmbeddingService(runtime="onnx", precision="int8", **TINY)
    with pytest.raises(ModelUnavailableError, match=r"needs about .* GiB of disk .* 0\.0 GiB free"):
        service.encoder  # noqa: B018
    assert not list(service.settings.onnx_dir.glob("*/*"))  # nothing written


def test_a_tokenizer_without_onnx_form_exports_the_image_tower_only(monkeypatch, photos):
    def unsupported(simple):
        raise ConfigurationError("this model's tokenizer has no ONNX equivalent")

    monkeypatch.setattr(TextTokenizer, "from_open_clip", unsupported)
    with ImageEmbeddingService(runtime="onnx", cache_embeddings=False, **TINY) as service:
        assert service.embed_image(photos[0]).shape == (64,)
        assert set(service.encoder.manifest["files"]) == {"visual.onnx"}
        with pytest.raises(ConfigurationError, match="no text tower"):
            service.embed_text("a cat")


def test_token_counts_are_what_the_text_tower_reads_on_both_runtimes():
    texts = ["a photo of a cat", "", "!~!~", "word " * 100, *TEXTS]
    with ImageEmbeddingService(**TINY) as torch_service:
        counts = torch_service.count_tokens(texts)
        assert torch_service.count_tokens([]) == []
        with pytest.raises(ConfigurationError, match="list of strings"):
            torch_service.count_tokens([b"bytes"])
    assert counts[:4] == [7, 2, 6, 77]  # start + tokens + end; "!~!~" has id 0 twice; cut at 77
    with ImageEmbeddingService(runtime="onnx", **TINY) as onnx_service:
        assert onnx_service.count_tokens(texts) == counts


def test_a_model_only_torch_runs_is_refused_before_any_export_is_announced(caplog, tmp_path):
    caplog.set_level(logging.INFO)
    service = ImageEmbeddingService(model="efficientnet-lite0", runtime="onnx", data_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="runs on the torch runtime only"):
        service.encoder  # noqa: B018
    assert not any("export" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "onnx").exists()


def test_token_counts_of_a_tokenizer_without_an_end_id_skip_its_own_padding():
    from imgembed.models.tokenizer import token_counts

    ids = np.array([[101, 7, 0, 102, 1, 1], [101, 102, 1, 1, 1, 1]])  # 0: a word; 1: padding
    assert token_counts(ids, None, pad=1) == [4, 2]
    assert token_counts(ids, eot=102) == [4, 2]
