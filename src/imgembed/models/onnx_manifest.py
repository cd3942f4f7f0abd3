"""The files of an ONNX export (models/onnx_export.py writes them, models/onnx_runtime.py
reads them): its folder, its manifest, and the check that every file is as exported."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imgembed.config import Settings
from imgembed.models import registry
from imgembed.models.preprocess import Preprocessor
from imgembed.models.registry import ModelRef

EXPORT_FORMAT = 3  # bump when the export changes what a model computes or how it is stored
ONNX_PRECISIONS = ("fp32", "int8")
MANIFEST = "imgembed-export.json"


def export_dir(settings: Settings, ref: ModelRef, precision: str) -> Path:
    source = f"{ref.name}|{ref.pretrained}"
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{ref.name}__{Path(ref.pretrained).name}")
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return settings.onnx_dir / f"{readable[:60]}-{digest}-{precision}"


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


# A file of the export: a plain name inside its folder, never a path out of it.
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")]


class _FileRecord(BaseModel):
    model_config = ConfigDict(strict=True)
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: Annotated[int, Field(ge=0)]


class _TokenizerSpec(BaseModel):
    model_config = ConfigDict(strict=True)
    sot: int
    eot: int
    context_length: Annotated[int, Field(gt=0)]
    lower: bool


class _Manifest(BaseModel):
    """What the runtime reads from a manifest, checked before anything uses it."""

    model_config = ConfigDict(strict=True)
    weights: str
    dimension: Annotated[int, Field(gt=0)]
    preprocess: dict[str, Any]
    towers: dict[Literal["visual", "text"], FileName]
    tokenizer: _TokenizerSpec | None
    files: dict[FileName, _FileRecord]

    @model_validator(mode="after")
    def _consistent(self) -> _Manifest:
        if "visual" not in self.towers:
            raise ValueError("no image tower")
        unlisted = set(self.towers.values()) - set(self.files)
        if unlisted:
            raise ValueError(f"no sha256 for {', '.join(sorted(unlisted))}")
        if "text" in self.towers and self.tokenizer is None:
            raise ValueError("a text tower without its tokenizer")
        try:
            same = Preprocessor.from_config(self.preprocess).as_dict() == self.preprocess
        except Exception as exc:  # KeyError, TypeError, ValueError from odd values
            raise ValueError(f"unreadable preprocess ({exc!r})") from exc
        if not same:
            raise ValueError("preprocess is not as exported")
        return self


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The sha256 of a file, computed once per process for each version of it (path, inode,
    size, mtime): a second service, or a second look, pays only a stat."""
    stat = path.stat()
    key = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        _DIGESTS[key] = digest
    return digest


def check_export(folder: Path, ref: ModelRef) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) if the export in `folder` can be used for `ref` as it is now, else
    (None, why not). Every file is checked against the manifest's size and sha256."""
    if folder.exists() and not folder.is_dir():
        return None, f"{folder} is not a folder"
    path = folder / MANIFEST
    if not path.exists():
        return None, "not exported yet"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"its manifest {MANIFEST} is damaged ({exc})"
    if not isinstance(manifest, dict):
        return None, f"its manifest {MANIFEST} is damaged (not a JSON object)"
    if manifest.get("format") != EXPORT_FORMAT:
        return None, "exported by another version of imgembed"
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors()[:3]
        )
        return None, f"its manifest {MANIFEST} is damaged ({problems})"
    try:
        current = registry.weights_id(ref)
    except (OSError, importlib.metadata.PackageNotFoundError):
        current = None  # the source weights are gone: the export is all there is
    if current is not None and manifest["weights"] != current:
        return None, f"the weights changed since the export ({manifest['weights']} -> {current})"
    listed = sorted(manifest["files"].items())
    # Sizes first: cheap, and most damage shows there; then every file's sha256.
    problems = [_size_problem(folder / name, record["bytes"]) for name, record in listed]
    if not any(problems):  # hashlib lets go of the GIL: the files are hashed side by side
        with ThreadPoolExecutor(len(listed), thread_name_prefix="imgembed-sha256") as pool:
            problems = list(
                pool.map(lambda item: _digest_problem(folder / item[0], item[1]["sha256"]), listed)
            )
    damaged = "; ".join(problem for problem in problems if problem)
    return (None, damaged) if damaged else (manifest, None)


def _size_problem(path: Path, size: int) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing or damaged (not a file)"
    actual = path.stat().st_size
    if actual != size:
        return f"{path.name} is missing or damaged ({actual} bytes, {size} exported)"
    return None


def _digest_problem(path: Path, sha256: str) -> str | None:
    try:
        digest = file_sha256(path)
    except OSError as exc:
        return f"{path.name} is missing or damaged (unreadable: {exc})"
    if digest != sha256:
        return f"{path.name} is missing or damaged (its sha256 differs from the manifest's)"
    return None


def stale_reason(folder: Path, ref: ModelRef) -> str | None:
    """Why the export in `folder` cannot be used for `ref` as it is now, or None."""
    return check_export(folder, ref)[1]
