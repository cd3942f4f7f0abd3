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
from pathlib import Path
from typing import Any

import numpy as np

from imgembed.config import Settings
from imgembed.errors import ConfigurationError, EncodeError, ModelUnavailableError
from imgembed.models import registry
from imgembed.models.preprocess import Preprocessor
from imgembed.models.registry import ModelRef
from imgembed.models.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

EXPORT_FORMAT = 2  # bump when the export changes what a model computes or how it is stored
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


def stale_reason(folder: Path, ref: ModelRef) -> str | None:
    """Why the export in `folder` cannot be used for `ref` as it is now, or None."""
    manifest = read_manifest(folder)
    if manifest is None:
        return "not exported yet"
    if manifest.get("format") != EXPORT_FORMAT:
        return "exported by another version of imgembed"
    try:
        current = registry.weights_id(ref)
    except (OSError, importlib.metadata.PackageNotFoundError):
        current = None  # the source weights are gone: the export is all there is
    if current is not None and manifest["weights"] != current:
        return f"the weights changed since the export ({manifest['weights']} -> {current})"
    for name, record in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            return f"{name} is missing or damaged"
    return None


def ensure_export(ref: ModelRef, settings: Settings, precision: str) -> tuple[Path, dict]:
    """The up-to-date export for this model and precision, exporting it when needed."""
    folder = export_dir(settings, ref, precision)
    reason = stale_reason(folder, ref)
    if reason is not None:
        try:
            from imgembed.models.onnx_export import export
        except ImportError as exc:
            raise ModelUnavailableError(
                f"{ref}: no usable ONNX export ({precision}) in {folder}: {reason}. Exporting "
                f"needs torch ({exc}); run `imgembed models export {ref.name} --pretrained "
                f"{ref.pretrained} --precision {precision}` where torch is installed and copy "
                f"the folder here (or set IMGEMBED_MODEL_CACHE_DIR to where it is)"
            ) from exc
        log.warning("%s: %s; exporting to ONNX (%s) into %s", ref, reason, precision, folder)
        export(ref, precision, settings)
    manifest = read_manifest(folder)
    assert manifest is not None
    return folder, manifest


def _session(path: Path, threads: int) -> Any:
    """One session per file and process; onnxruntime's `run` is thread-safe."""
    import onnxruntime as ort

    key = (str(path), threads)
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
        self._visual = _session(self.folder / visual, self._threads)
        self._text: Any = None  # loaded on the first text: image jobs never pay for it
        self._tokenizer: TextTokenizer | None = None

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
            self._tokenizer = TextTokenizer.load(self.folder, self.manifest["tokenizer"])
            self._text = _session(self.folder / text_file, self._threads)
        assert self._tokenizer is not None
        try:
            return self._text.run(None, {"input": self._tokenizer(texts)})[0]
        except Exception as exc:
            raise EncodeError(f"{self.ref}: text encoding failed: {exc}") from exc
