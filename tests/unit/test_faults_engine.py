"""Fault injection for the engine: a damaged, full or read-only embedding cache, damaged ONNX
exports, and encoders that return NaN. Every run still embeds every image correctly (cosine
to a cache-off run >= 0.99999) or fails with a typed error; nothing returns a non-finite
vector or a traceback."""

import errno
import gc
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import diskcache
import numpy as np
import pytest

from imgembed import EncodeError, ImageEmbeddingService, ModelUnavailableError
from imgembed.engine.cache import EmbeddingCache
from imgembed.engine.pipeline import ImagePipeline
from imgembed.intake.image_input import Intake
from imgembed.models import onnx_manifest
from tests.conftest import TINY
from tests.reference import rowwise_cosine

ROOT = Path(__file__).resolve().parents[2]
CACHE_LOGGER = "imgembed.engine.cache"


def _vectors(results) -> np.ndarray:
    assert all(r.ok for r in results), [str(r.error) for r in results if r.error]
    return np.stack([r.embedding for r in results])


def _same(vectors, reference) -> None:
    assert np.isfinite(vectors).all()
    assert rowwise_cosine(np.asarray(vectors), reference).min() >= 0.99999


def _cache_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == CACHE_LOGGER and r.levelno >= logging.WARNING
    ]


@pytest.fixture(scope="module")
def reference(photos) -> np.ndarray:
    """The photos' vectors from a run without the cache."""
    with ImageEmbeddingService(**TINY, cache_embeddings=False) as service:
        return _vectors(service.embed_images(photos))


def _populate(data_dir: Path, photos) -> Path:
    """A cache holding every photo, closed as at the end of a process; its cache.db."""
    with ImageEmbeddingService(**TINY, data_dir=data_dir) as service:
        service.embed_images(photos)
    del service
    gc.collect()  # the worker threads' connections close: the WAL is folded into cache.db
    db = data_dir / "cache" / "cache.db"
    assert sorted(p.name for p in db.parent.iterdir()) == ["cache.db"]
    return db


def _damage_file(db: Path, kind: str) -> None:
    if kind == "truncated":
        os.truncate(db, db.stat().st_size // 2)
    elif kind == "garbage header":
        with db.open("r+b") as f:
            f.write(os.urandom(100))
    else:  # a directory in its place
        db.unlink()
        db.mkdir()
        (db / "something").write_text("not a database")


# -- the cache file --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated", "garbage header", "directory"])
def test_a_damaged_cache_file_is_set_aside_and_rebuilt(kind, photos, reference, tmp_path, caplog):
    db = _populate(tmp_path, photos)
    _damage_file(db, kind)
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    with ImageEmbeddingService(**TINY, data_dir=tmp_path) as service:
        results = service.embed_images(photos)
    _same(_vectors(results), reference)
    assert not any(r.cached for r in results)
    (warning,) = _cache_warnings(caplog)
    assert "damaged" in warning and "cache.db.corrupt-" in warning
    aside = list(db.parent.glob("cache.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].is_dir() == (kind == "directory")

    caplog.clear()
    with ImageEmbeddingService(**TINY, data_dir=tmp_path) as service:  # the rebuilt cache
        again = service.embed_images(photos)
    assert all(r.cached for r in again)
    _same(_vectors(again), reference)
    assert _cache_warnings(caplog) == []


def test_damage_while_the_cache_is_open_in_many_threads(photos, reference, tmp_path, caplog):
    """The file is damaged under a running service: its decode threads each find it broken
    at once; one of them sets it aside, the others go on with the new file."""
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    with ImageEmbeddingService(**TINY, data_dir=tmp_path, max_workers=4, batch_size=2) as service:
        service.embed_images(photos)
        _damage_file(tmp_path / "cache" / "cache.db", "garbage header")
        results = service.embed_images(photos * 3)
        again = service.embed_images(photos)
    _same(_vectors(results), np.concatenate([reference] * 3))
    _same(_vectors(again), reference)
    assert all(r.cached for r in again)
    assert len(_cache_warnings(caplog)) == 1
    assert len(list((tmp_path / "cache").glob("cache.db.corrupt-*"))) == 1


_SECOND_PROCESS = """
import json, sys
from imgembed import ImageEmbeddingService
with ImageEmbeddingService(model="imgembed-tiny", pretrained="seed:0") as service:
    service.embed_images(sys.argv[1:])
    print("ready", flush=True)
    sys.stdin.readline()  # meanwhile the file is damaged and set aside by another process
    results = service.embed_images(sys.argv[1:])
print(json.dumps({"vectors": [r.embedding.tolist() for r in results],
                  "cached": [r.cached for r in results]}))
"""


def test_another_process_keeps_working_when_its_open_file_is_set_aside(
    photos, reference, tmp_path, caplog
):
    """Process B has the cache open while it is damaged; this process sets it aside. B goes
    on with the new file (SQLite keeps B's handles on the old one and does not delete the
    new file's journal by name when B closes them), and the rebuilt cache stays sound."""
    env = {**os.environ, "IMGEMBED_DATA_DIR": str(tmp_path)}
    paths = [str(p) for p in photos]
    other = subprocess.Popen(
        [sys.executable, "-c", _SECOND_PROCESS, *paths],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert other.stdout.readline().strip() == "ready", other.stderr.read()
        db = tmp_path / "cache" / "cache.db"
        _damage_file(db, "garbage header")
        caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
        with ImageEmbeddingService(**TINY, data_dir=tmp_path) as service:
            _same(_vectors(service.embed_images(photos)), reference)
        assert len(_cache_warnings(caplog)) == 1
        out, errors = other.communicate("\n", timeout=300)
    finally:
        other.kill()
    assert other.returncode == 0, errors
    second = json.loads(out)
    _same(second["vectors"], reference)
    assert all(second["cached"])  # B reads the entries this process wrote to the new file
    caplog.clear()
    gc.collect()
    with ImageEmbeddingService(**TINY, data_dir=tmp_path) as service:
        third = service.embed_images(photos)
    assert all(r.cached for r in third) and _cache_warnings(caplog) == []
    _same(_vectors(third), reference)
    assert len(list(db.parent.glob("cache.db.corrupt-*"))) == 1  # B set nothing else aside


def test_clear_cache_works_on_a_damaged_cache(photos, tmp_path, caplog):
    db = _populate(tmp_path, photos)
    _damage_file(db, "garbage header")
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    with ImageEmbeddingService(**TINY, data_dir=tmp_path) as service:
        assert service.clear_cache() == 0  # the damaged entries went with their file
        assert not list(db.parent.glob("*corrupt*"))  # and the file set aside is removed
        assert not any(r.cached for r in service.embed_images(photos))
        assert service.clear_cache() == len(photos)
    assert len(_cache_warnings(caplog)) == 1


# -- entries ---------------------------------------------------------------------------------


def _damage_entries(cache_dir: Path) -> dict[str, str]:
    """Four entries damaged four ways, through diskcache and SQLite; digest -> how."""
    with diskcache.Cache(str(cache_dir)) as cache:
        keys = sorted(cache.iterkeys())
        (raw, quality) = cache[keys[0]]
        cache[keys[1]] = (raw[: len(raw) // 2], quality)  # wrong length
        nan = np.frombuffer(raw, dtype=np.float32).copy()
        nan[3] = np.nan
        cache[keys[2]] = (nan.tobytes(), quality)
        cache[keys[3]] = raw  # not a (vector, quality) pair
    with sqlite3.connect(cache_dir / "cache.db") as db:  # a pickle that cannot be read
        db.execute("UPDATE Cache SET value = ? WHERE key = ?", (b"\x80\x04garbage", keys[0]))
    db.close()
    how = ["unpicklable", "wrong length", "NaN", "not a pair"]
    return {key.split(":")[1]: kind for key, kind in zip(keys, how, strict=False)}


def test_damaged_entries_are_dropped_and_recomputed(photos, reference, tmp_path, caplog):
    _populate(tmp_path, photos)
    damaged = _damage_entries(tmp_path / "cache")
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    with ImageEmbeddingService(**TINY, data_dir=tmp_path) as service:
        results = service.embed_images(photos)
        _same(_vectors(results), reference)  # no InvalidImageError: not the image's fault
        for result in results:
            assert result.cached == (result.image_id not in damaged), result.image_path
        assert len(_cache_warnings(caplog)) == 1  # per cache, not per entry
        again = service.embed_images(photos)  # recomputed entries were written back
    assert all(r.cached for r in again)
    _same(_vectors(again), reference)


def test_an_entry_of_another_dimension_is_never_returned(tmp_path):
    cache = EmbeddingCache(tmp_path, "model")
    cache.put("abc", np.ones(64, dtype=np.float32), {"confidence": 1.0})
    assert cache.get("abc", 64)[0].shape == (64,)
    assert cache.get("abc", 512) is None
    assert cache.get("abc", 64) is None  # dropped: it is recomputed next time


# -- full or read-only disk ------------------------------------------------------------------


def test_a_failing_write_turns_writing_off_once(photos, reference, tmp_path, monkeypatch, caplog):
    """ENOSPC injected into diskcache: the run goes on, reading what is cached."""
    _populate(tmp_path, photos[:2])
    calls = []

    def full(self, *args, **kwargs):
        calls.append(args[0])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskcache.Cache, "set", full)
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    with ImageEmbeddingService(**TINY, data_dir=tmp_path) as service:
        results = service.embed_images(photos)
        service.embed_images(photos)
    _same(_vectors(results), reference)
    assert [r.cached for r in results] == [True, True] + [False] * (len(photos) - 2)
    assert len(calls) == 1  # then no more attempts
    (warning,) = _cache_warnings(caplog)
    assert "cannot be written" in warning and "No space left" in warning


def _namespaces_unavailable() -> str | None:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare/mount not installed"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no private mount namespace here (needs root): {probe.stderr.strip()}"
    return None


@pytest.mark.parametrize("scenario", ["full", "full-at-start", "read-only"])
def test_full_or_read_only_disk_under_the_cache(scenario, photos, reference, tmp_path):
    """A real 4 MB tmpfs in a private mount namespace, filled up while the cache is in use,
    full before it opens, or remounted read-only (tests/disk_faults.py)."""
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(f"{reason}; test_a_failing_write_turns_writing_off_once injects ENOSPC")
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = str(ROOT / "tests" / "disk_faults.py")
    run = subprocess.run(
        ["unshare", "-m", sys.executable, script, scenario, str(mount), *map(str, photos)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["errors"] == []
    _same(out["vectors"], reference)
    (warning,) = out["warnings"]
    expected = {
        "full": ("cannot be written", "disk is full"),
        "full-at-start": ("running without it", "is full"),
        "read-only": ("running without it", "not writable"),
    }[scenario]
    assert all(part in warning for part in expected), warning
    if scenario == "full":  # what was cached before the disk filled up is still served
        assert out["cached"] == [True] + [False] * (len(photos) - 1)


# -- non-finite vectors ----------------------------------------------------------------------


class _PoisonRows:
    """A real encoder whose output has NaN / infinity in chosen rows."""

    def __init__(self, encoder, rows):
        self._rows = rows
        self._images, self._texts = encoder.encode_images, encoder.encode_texts
        self.ref, self.dimension = encoder.ref, encoder.dimension
        self.preprocessor, self.fingerprint = encoder.preprocessor, encoder.fingerprint

    def _poison(self, vectors):
        vectors = np.array(vectors)
        for row, value in self._rows.items():
            if row < len(vectors):
                vectors[row, 1] = value
        return vectors

    def encode_images(self, batch):
        return self._poison(self._images(batch))

    def encode_texts(self, texts):
        return self._poison(self._texts(texts))


@pytest.mark.parametrize(
    "settings",
    [TINY, {**TINY, "runtime": "onnx"}, {"model": "efficientnet-lite0"}],
    ids=["torch", "onnx", "efficientnet"],
)
def test_a_non_finite_row_fails_only_its_item(settings, photos, tmp_path):
    with ImageEmbeddingService(**settings, cache_embeddings=False) as service:
        expected = _vectors(service.embed_images(photos))
        poisoned = _PoisonRows(service.encoder, {1: np.nan, 3: np.inf})
    cache = EmbeddingCache(tmp_path / "cache", "poisoned")
    pipeline = ImagePipeline(poisoned, service.settings, cache, Intake(service.settings))
    results = list(pipeline.iter_results(photos))
    for i, result in enumerate(results):
        if i in (1, 3):
            assert isinstance(result.error, EncodeError) and result.embedding is None
            assert "non-finite" in str(result.error) and photos[i].name in str(result.error)
        else:
            assert result.ok
            _same(result.embedding[None], expected[i][None])
    again = list(pipeline.iter_results(photos))  # failed items were not cached
    assert [r.cached for r in again] == [i not in (1, 3) for i in range(len(photos))]


def test_a_wrong_shape_from_the_encoder_fails_the_batch_not_the_run(photos, tmp_path):
    with ImageEmbeddingService(**TINY, cache_embeddings=False, batch_size=2) as service:
        encoder = service.encoder

        class Short(_PoisonRows):
            def encode_images(self, batch):
                return super().encode_images(batch)[:1]

        pipeline = ImagePipeline(Short(encoder, {}), service.settings, None, service.intake)
        results = list(pipeline.iter_results(photos))
    assert all(isinstance(r.error, EncodeError) and "shape" in str(r.error) for r in results)


def test_a_non_finite_text_vector_is_an_encode_error(monkeypatch):
    with ImageEmbeddingService(**TINY) as service:
        good = service.embed_texts(["a cat", "a dog", "a red bicycle"])
        poisoned = _PoisonRows(service.encoder, {1: np.nan})
        monkeypatch.setattr(service.encoder, "encode_texts", poisoned.encode_texts)
        with pytest.raises(EncodeError, match=r"non-finite.*#1 'a dog'"):
            service.embed_texts(["a cat", "a dog", "a red bicycle"])
        monkeypatch.undo()
        np.testing.assert_allclose(service.embed_texts(["a cat"]), good[:1], atol=1e-6)


# -- ONNX exports ----------------------------------------------------------------------------

NO_TORCH = str(ROOT / "tests" / "no_torch.py")
ONNX = {**TINY, "runtime": "onnx", "cache_embeddings": False}


@pytest.fixture(scope="module")
def pristine_export(tmp_path_factory, photos):
    """A tiny-model fp32 export and its vectors for the photos and a few texts."""
    models = tmp_path_factory.mktemp("models")
    with ImageEmbeddingService(**ONNX, model_cache_dir=models) as service:
        images = _vectors(service.embed_images(photos))
        texts = service.embed_texts(["a cat", "a red bicycle"])
        folder = service.encoder.folder
    return models, folder.relative_to(models), images, texts


@pytest.fixture
def export(pristine_export, tmp_path):
    """A fresh copy of the export, for this test to damage: (model_cache_dir, folder)."""
    models, folder, _, _ = pristine_export
    copy = tmp_path / "models"
    shutil.copytree(models, copy)
    return copy, copy / folder


def _flip_bytes(path: Path, at: float = 0.5, count: int = 64) -> None:
    """Same-size damage: invert `count` bytes from `at` (a fraction of the file)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / onnx_manifest.MANIFEST).read_text())


def _set_manifest(folder: Path, text: str) -> None:
    (folder / onnx_manifest.MANIFEST).write_text(text)


def _without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "imgembed.models.onnx_export", None)  # import fails


def test_same_size_damage_in_the_weights_would_change_the_vectors(export, photos):
    """Why the sha256 matters: the damaged file loads and runs, with other vectors."""
    import onnxruntime as ort

    models, folder = export
    with ImageEmbeddingService(**ONNX, model_cache_dir=models) as service:
        pixels = np.stack([service.encoder.preprocessor(_rgb(p)) for p in photos])
    clean = ort.InferenceSession(str(folder / "visual.onnx")).run(None, {"input": pixels})[0]
    size = (folder / "visual.onnx").stat().st_size
    _flip_bytes(folder / "visual.onnx")
    assert (folder / "visual.onnx").stat().st_size == size
    damaged = ort.InferenceSession(str(folder / "visual.onnx")).run(None, {"input": pixels})[0]
    assert not np.isfinite(damaged).all() or rowwise_cosine(damaged, clean).min() < 0.999


def _rgb(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_damaged_weights_are_exported_anew(export, pristine_export, photos, caplog):
    _, _, images, texts = pristine_export
    models, folder = export
    _flip_bytes(folder / "visual.onnx")
    _flip_bytes(folder / "text.onnx", at=0.6)
    caplog.set_level(logging.WARNING, logger="imgembed.models.onnx_runtime")
    with ImageEmbeddingService(**ONNX, model_cache_dir=models) as service:
        _same(_vectors(service.embed_images(photos)), images)
        _same(service.embed_texts(["a cat", "a red bicycle"]), texts)
    (warning,) = [r.getMessage() for r in caplog.records]
    for name in ("text.onnx", "visual.onnx"):
        assert f"{name} is missing or damaged (its sha256 differs" in warning
    assert "exporting to ONNX" in warning


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("weights", "visual.onnx is missing or damaged (its sha256 differs"),
        ("tokenizer", "tokenizer.json is missing or damaged (its sha256 differs"),
        ("bad json", "manifest imgembed-export.json is damaged (Unterminated string"),
        ("missing key", "manifest imgembed-export.json is damaged (files: Field required"),
        ("wrong type", "manifest imgembed-export.json is damaged (dimension: Input should be"),
        ("path out", "manifest imgembed-export.json is damaged (towers.visual: String should"),
        ("not an object", "manifest imgembed-export.json is damaged (not a JSON object"),
        ("folder is a file", "is not a folder"),
    ],
)
def test_a_damaged_export_without_torch_is_model_unavailable(export, monkeypatch, damage, reason):
    models, folder = export
    manifest = _manifest(folder)
    if damage == "weights":
        _flip_bytes(folder / "visual.onnx")
    elif damage == "tokenizer":
        _flip_bytes(folder / "tokenizer.json", at=0.3, count=16)
    elif damage == "bad json":
        _set_manifest(folder, json.dumps(manifest)[:-40])
    elif damage == "missing key":
        _set_manifest(folder, json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    elif damage == "wrong type":
        _set_manifest(folder, json.dumps({**manifest, "dimension": "64"}))
    elif damage == "path out":
        towers = {**manifest["towers"], "visual": "../../visual.onnx"}
        _set_manifest(folder, json.dumps({**manifest, "towers": towers}))
    elif damage == "not an object":
        _set_manifest(folder, "[]")
    else:
        shutil.rmtree(folder)
        folder.write_text("not an export")
    _without_torch(monkeypatch)
    with pytest.raises(ModelUnavailableError) as caught:
        ImageEmbeddingService(**ONNX, model_cache_dir=models).encoder  # noqa: B018
    message = str(caught.value)
    assert reason in message, message
    assert "imgembed models export imgembed-tiny --pretrained seed:0 --precision fp32" in message


@pytest.mark.parametrize("damage", ["bad json", "tokenizer", "folder is a file"])
def test_a_damaged_export_with_torch_is_exported_anew(
    export, pristine_export, photos, damage, caplog
):
    _, _, images, texts = pristine_export
    models, folder = export
    if damage == "bad json":
        _set_manifest(folder, "{not json")
    elif damage == "tokenizer":
        _flip_bytes(folder / "tokenizer.json", at=0.3, count=16)
    else:
        shutil.rmtree(folder)
        folder.write_text("not an export")
    caplog.set_level(logging.WARNING, logger="imgembed.models.onnx_runtime")
    with ImageEmbeddingService(**ONNX, model_cache_dir=models) as service:
        _same(_vectors(service.embed_images(photos)), images)
        _same(service.embed_texts(["a cat", "a red bicycle"]), texts)
    assert len(caplog.records) == 1 and "exporting to ONNX" in caplog.records[0].getMessage()
    assert _manifest(folder)["files"]["tokenizer.json"]["bytes"] > 0


def test_an_unlisted_damaged_tokenizer_is_model_unavailable(export, monkeypatch):
    """Exports made before tokenizer.json was hashed: its damage shows when it loads."""
    models, folder = export
    manifest = _manifest(folder)
    del manifest["files"]["tokenizer.json"]
    _set_manifest(folder, json.dumps(manifest))
    (folder / "tokenizer.json").write_text('{"truncated": ')
    service = ImageEmbeddingService(**ONNX, model_cache_dir=models)
    with pytest.raises(ModelUnavailableError, match=r"tokenizer.json.*--force"):
        service.embed_texts(["a cat"])


def test_files_are_hashed_once_per_process(export, monkeypatch, photos):
    models, folder = export
    hashed = []
    real = onnx_manifest.hashlib.file_digest

    def counting(f, name):
        hashed.append(Path(f.name).name)
        return real(f, name)

    monkeypatch.setattr(onnx_manifest.hashlib, "file_digest", counting)
    for _ in range(2):  # a second service in the process pays only a stat per file
        with ImageEmbeddingService(**ONNX, model_cache_dir=models) as service:
            service.embed_images(photos[:1])
    assert sorted(hashed) == ["text.onnx", "tokenizer.json", "visual.onnx"]
    os.utime(folder / "text.onnx")  # a file that changed is hashed again
    ImageEmbeddingService(**ONNX, model_cache_dir=models).encoder  # noqa: B018
    assert sorted(hashed) == ["text.onnx", "text.onnx", "tokenizer.json", "visual.onnx"]


def test_damaged_export_in_a_process_without_torch_exits_4(export, photos):
    models, folder = export
    _flip_bytes(folder / "visual.onnx")
    env = {**os.environ, "IMGEMBED_MODEL_CACHE_DIR": str(models)}
    args = ["--runtime", "onnx", "--model", "imgembed-tiny", "--pretrained", "seed:0"]
    run = subprocess.run(
        [sys.executable, NO_TORCH, "embed", str(photos[0]), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 4, run.stderr  # 97 would mean torch was imported
    assert "visual.onnx is missing or damaged (its sha256 differs" in run.stderr
    assert "imgembed models export imgembed-tiny --pretrained seed:0" in run.stderr
    assert run.stdout == ""  # no vectors


def test_sessions_follow_a_re_export(photos, tmp_path):
    """New weights in the same checkpoint file are exported anew to the same path; the
    process must not reuse the session of the old file (sessions are keyed by digest)."""
    import open_clip
    import torch

    from imgembed.models import registry

    registry.open_clip()
    checkpoint = tmp_path / "tiny.pt"
    vectors = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        torch.save(open_clip.create_model("imgembed-tiny").state_dict(), checkpoint)
        settings = {"model": "imgembed-tiny", "pretrained": str(checkpoint)}
        with ImageEmbeddingService(**settings, runtime="onnx", cache_embeddings=False) as onnx:
            vectors.append(_vectors(onnx.embed_images(photos)))
        with ImageEmbeddingService(**settings, cache_embeddings=False) as reference:
            _same(vectors[-1], _vectors(reference.embed_images(photos)))
    assert rowwise_cosine(vectors[0], vectors[1]).max() < 0.99
