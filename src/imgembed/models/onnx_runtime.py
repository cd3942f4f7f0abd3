"""The ONNX runtime: a model's towers are exported once (models/onnx_export.py, which needs
torch) and then run on onnxruntime, with the NumPy preprocessing and the `tokenizers` BPE.
Nothing in this module imports torch: a process on this runtime never loads it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgembed.config import Settings
from imgembed.errors import ConfigurationError, EncodeError, ModelUnavailableError
from imgembed.models import registry
from imgembed.models.onnx_manifest import ONNX_PRECISIONS, check_export, export_dir
from imgembed.models.preprocess import Preprocessor
from imgembed.models.registry import ModelRef
from imgembed.models.tokenizer import TextTokenizer, token_counts

log = logging.getLogger(__name__)

_SESSIONS: dict[tuple[str, int], Any] = {}
_SESSIONS_LOCK = threading.Lock()


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
    # before "exporting ..." (or "exporting needs torch"): weights that are not there
    registry.check_weights_there(ref)
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
        tokenizer = self._text_tokenizer()
        if self._text is None:
            self._text = self._load(self.manifest["towers"]["text"])
        try:
            return self._text.run(None, {"input": tokenizer(texts)})[0]
        except Exception as exc:
            raise EncodeError(f"{self.ref}: text encoding failed: {exc}") from exc

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        tokenizer = self._text_tokenizer()
        return token_counts(tokenizer(texts), tokenizer.spec.eot)

    def _text_tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            if self.manifest["towers"].get("text") is None:
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
        return self._tokenizer
