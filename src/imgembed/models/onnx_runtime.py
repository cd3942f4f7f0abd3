"""The ONNX runtime: a model's towers are exported once (models/onnx_export.py, which needs
torch) and then run on onnxruntime, with the NumPy preprocessing and the `tokenizers` BPE.
Nothing in this module imports torch: a process on this runtime never loads it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imgembed.config import Settings
from imgembed.errors import ConfigurationError, EncodeError, ModelUnavailableError
from imgembed.models import registry
from imgembed.models.preprocess import Preprocessor
from imgembed.models.registry import ModelRef
from imgembed.models.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

EXPORT_FORMAT = 3  # bump when the export changes what a model computes or how it is stored
ONNX_PRECISIONS = ("fp32", "int8")
MANIFEST = "imgembed-export.json"

_SESSIONS: dict[tuple[str, int], Any] = {}
_SESSIONS_LOCK = threading.Lock()


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


def _export_command(ref: ModelRef, precision: str) -> str:
    return (
        f"imgembed models export {ref.name} --pretrained {ref.pretrained} --precision {precision}"
    )


def ensure_export(ref: ModelRef, settings: Settings, precision: str) -> tuple[Path, dict]:
    """The up-to-date, verified export for this model and precision, exported when needed."""
    folder = export_dir(settings, ref, precision)
    manifest, reason = check_export(folder, ref)
    if manifest is not None:
        return folder, manifest
    try:
        from imgembed.models.onnx_export import export
    except ImportError as exc:
        raise ModelUnavailableError(
            f"{ref}: no usable ONNX export ({precision}) in {folder}: {reason}. Exporting "
            f"needs torch ({exc}); run `{_export_command(ref, precision)}` where torch is "
            "installed and copy the folder here (or set IMGEMBED_MODEL_CACHE_DIR to where it is)"
        ) from exc
    log.warning("%s: %s; exporting to ONNX (%s) into %s", ref, reason, precision, folder)
    export(ref, precision, settings)
    manifest, reason = check_export(folder, ref)
    if manifest is None:  # e.g. another process damaged or replaced it meanwhile
        raise ModelUnavailableError(f"{ref}: the ONNX export just made in {folder}: {reason}")
    return folder, manifest


def _session(path: Path, sha256: str, threads: int) -> Any:
    """One session per file (as verified) and process; onnxruntime's `run` is thread-safe.
    The digest is part of the key: a file exported anew gets a new session."""
    import onnxruntime as ort

    key = (str(path), sha256, threads)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            # Idle encoder threads spin by default, taking the cores from the decode workers.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                _SESSIONS[key] = ort.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # onnxruntime's own error types
                raise ModelUnavailableError(f"cannot load {path}: {exc}") from exc
        return _SESSIONS[key]


class OnnxEncoder:
    """An exported open_clip model on onnxruntime (CPU), fp32 or dynamic int8."""

    def __init__(self, ref: ModelRef, settings: Settings):
        precision = settings.precision
        if precision not in ONNX_PRECISIONS:
            raise ConfigurationError(
                f"precision {precision!r} is not available on the ONNX runtime "
                f"({', '.join(ONNX_PRECISIONS)})"
            )
        if settings.device not in ("auto", "cpu"):
            raise ConfigurationError("the ONNX runtime runs on the CPU; set IMGEMBED_DEVICE=cpu")
        self.folder, self.manifest = ensure_export(ref, settings, precision)
        self.ref = ref
        self.dimension = int(self.manifest["dimension"])
        self.preprocessor = Preprocessor.from_config(self.manifest["preprocess"])
        visual = self.manifest["towers"]["visual"]
        export_id = self.manifest["files"][visual]["sha256"][:12]
        self.fingerprint = f"onnx/{precision}/{self.manifest['weights']}/{export_id}"
        self._threads = settings.encode_threads
        self._precision = precision
        self._visual = self._load(visual)
        self._text: Any = None  # loaded on the first text: image jobs never pay for it
        self._tokenizer: TextTokenizer | None = None

    def _load(self, name: str) -> Any:
        return _session(self.folder / name, self.manifest["files"][name]["sha256"], self._threads)

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        try:
            pixels = np.ascontiguousarray(batch, dtype=np.float32)
            return self._visual.run(None, {"input": pixels})[0]
        except Exception as exc:
            raise EncodeError(f"{self.ref}: image encoding failed: {exc}") from exc

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self._text is None:
            text_file = self.manifest["towers"].get("text")
            if text_file is None:
                raise ConfigurationError(
                    f"{self.ref}: the ONNX export has no text tower; use IMGEMBED_RUNTIME=torch"
                )
            try:
                self._tokenizer = TextTokenizer.load(self.folder, self.manifest["tokenizer"])
            except Exception as exc:  # `tokenizers` raises its own plain Exception
                raise ModelUnavailableError(
                    f"{self.ref}: cannot load {self.folder / TextTokenizer.FILE} of the ONNX "
                    f"export ({exc}); export it anew: `{_export_command(self.ref, self._precision)}"
                    " --force`"
                ) from exc
            self._text = self._load(text_file)
        assert self._tokenizer is not None
        try:
            return self._text.run(None, {"input": self._tokenizer(texts)})[0]
        except Exception as exc:
            raise EncodeError(f"{self.ref}: text encoding failed: {exc}") from exc
