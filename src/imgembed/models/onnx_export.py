"""Exports an open_clip model's image and text towers to ONNX, fp32 or int8. This is the only
ONNX step that needs torch; the result runs on onnxruntime alone (models/onnx_runtime.py)."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from imgembed.config import Settings
from imgembed.errors import ConfigurationError, ImgEmbedError, ModelUnavailableError
from imgembed.models import registry
from imgembed.models.loader import load_model, quiet_root_logger
from imgembed.models.onnx_manifest import (
    EXPORT_FORMAT,
    ONNX_PRECISIONS,
    export_dir,
    file_sha256,
    stale_reason,
    write_manifest,
)
from imgembed.models.preprocess import Preprocessor
from imgembed.models.registry import ModelRef
from imgembed.models.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

OPSET = 17


class _Tower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, text: bool):
        super().__init__()
        self.model = model
        self.text = text
        for block in model.modules():
            attention = getattr(block, "attn", None)
            if _SelfAttention.fits(attention):
                block.attn = _SelfAttention(attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(x) if self.text else self.model.encode_image(x)


class _SelfAttention(torch.nn.Module):
    """nn.MultiheadAttention's self-attention (same weights, same sums) written for the
    exporter: torch's own module exports as ~8 transposes and dozens of shape ops per layer,
    this as one projection, 4 transposes and matrix products. Measured on ViT-B-32 int8:
    1.04-1.13x the speed of the image tower, cosine to open_clip unchanged."""

    def __init__(self, attention: torch.nn.MultiheadAttention):
        super().__init__()
        self.heads = attention.num_heads
        self.in_proj_weight = attention.in_proj_weight
        self.in_proj_bias = attention.in_proj_bias
        self.out_proj = attention.out_proj
        self.original = attention  # for cross-attention, which this does not cover

    @staticmethod
    def fits(attention: object) -> bool:
        return (
            isinstance(attention, torch.nn.MultiheadAttention)
            and attention.batch_first
            and attention._qkv_same_embed_dim
            and attention.in_proj_bias is not None
            and attention.bias_k is None
            and not attention.add_zero_attn
        )

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, **kwargs):
        attn_mask = kwargs.get("attn_mask")
        plain = kwargs.keys() <= {"attn_mask", "average_attn_weights"} and not need_weights
        if (
            key is not query
            or value is not query
            or key_padding_mask is not None
            or not plain
            or (attn_mask is not None and not attn_mask.is_floating_point())
        ):
            return self.original(query, key, value, key_padding_mask, need_weights, **kwargs)
        batch, tokens, width = query.shape
        depth = width // self.heads
        qkv = torch.nn.functional.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, self.heads, depth).unbind(2)
        scores = (q.transpose(1, 2) * depth**-0.5) @ k.permute(0, 2, 3, 1)
        if attn_mask is not None:  # additive (open_clip's causal mask for texts)
            scores = scores + attn_mask
        out = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)
        return self.out_proj(out.reshape(batch, tokens, width)), None


def export(ref: ModelRef, precision: str, settings: Settings) -> Path:
    """Writes the export into a temporary folder and moves it into place when complete, so
    an interrupted export leaves nothing half-written behind."""
    if precision not in ONNX_PRECISIONS:
        raise ConfigurationError(f"ONNX precision is one of {', '.join(ONNX_PRECISIONS)}")
    if registry.facts(ref.name).family != "open_clip":
        raise ConfigurationError(f"{ref.name} runs on the torch runtime only")
    started = time.perf_counter()
    loaded = load_model(ref, "cpu", "fp32", settings.model_cache_dir, shared=False)
    preprocessor = Preprocessor.from_config(loaded.preprocess_cfg)
    target = export_dir(settings, ref, precision)
    target.parent.mkdir(parents=True, exist_ok=True)
    _check_space(ref, loaded.model, precision, target.parent)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        files, text = _export_towers(ref, loaded, preprocessor, precision, work)
        manifest = {
            "format": EXPORT_FORMAT,
            "model": ref.name,
            "pretrained": ref.pretrained,
            "precision": precision,
            "opset": OPSET,
            "weights": loaded.weights_id,
            "dimension": loaded.dimension,
            "preprocess": preprocessor.as_dict(),
            "towers": files,
            "tokenizer": text,
            "files": {name: _file_record(work / name) for name in _written(files, text)},
            "exported_with": {
                pkg: importlib.metadata.version(pkg)
                for pkg in ("imgembed", "torch", "open_clip_torch", "onnx", "onnxruntime")
            },
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_manifest(work, manifest)
        if target.is_dir() and not target.is_symlink():  # stale
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():  # a file in its place
            target.unlink()
        try:
            os.replace(work, target)
        except OSError:  # another process has just put the same export there
            if stale_reason(target, ref) is not None:
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("exported %s (%s) to %s in %.0f s", ref, precision, target, manifest["seconds"])
    return target


def _check_space(ref: ModelRef, model: torch.nn.Module, precision: str, folder: Path) -> None:
    """A typed error before the export when the folder cannot hold it: onnx's shape
    inference does not notice a full disk and leaves a cut file that fails to parse later
    ('Wire format was corrupt'). Peak use: the fp32 towers (about the weights' size), and
    for int8 a second copy of a tower plus its quantised form."""
    weights = sum(p.numel() * 4 for p in model.parameters())
    needed = int(weights * (2.3 if precision == "int8" else 1.1))
    free = shutil.disk_usage(folder).free
    if free < needed:  # the server's disk, not the request: a 503 over HTTP, exit 4
        raise ModelUnavailableError(
            f"exporting {ref} to ONNX ({precision}) needs about {needed / 2**30:.1f} GiB of disk"
            f" in {folder}, which has {free / 2**30:.1f} GiB free; free some space or point"
            " IMGEMBED_MODEL_CACHE_DIR elsewhere"
        )


def _export_towers(
    ref: ModelRef, loaded: Any, preprocessor: Preprocessor, precision: str, work: Path
) -> tuple[dict[str, str], dict[str, Any] | None]:
    """The towers' ONNX files (and the tokenizer) in `work`; a typed error if torch's
    exporter or the quantiser cannot handle this architecture."""
    try:
        files = {"visual": "visual.onnx"}
        pixels = torch.zeros(2, 3, *preprocessor.size)
        _export_tower(_Tower(loaded.model, text=False), pixels, work / files["visual"])
        text: dict[str, Any] | None = None
        try:
            tokenizer = TextTokenizer.from_open_clip(loaded.tokenizer)
        except (ConfigurationError, AttributeError) as exc:
            log.warning("%s: exporting the image tower only (%s)", ref, exc)
        else:
            files["text"] = "text.onnx"
            tokens = torch.from_numpy(tokenizer(["a photo", "of a cat"]))
            _export_tower(_Tower(loaded.model, text=True), tokens, work / files["text"])
            text = tokenizer.save(work)
        if precision == "int8":
            for name in files.values():
                _quantize(work / name)
    except ImgEmbedError:
        raise
    except Exception as exc:  # torch's exporter and onnxruntime's tools raise many kinds
        raise ConfigurationError(
            f"{ref} cannot be exported to ONNX ({precision}): {exc}; use IMGEMBED_RUNTIME=torch"
        ) from exc
    return files, text


def _export_tower(tower: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    # The TorchScript exporter, on purpose: torch 2.14's dynamo exporter took 4x longer on
    # ViT-B-32 and wrote an invalid text graph (duplicate output name). It warns that it is
    # deprecated and about index ops whose indices are never negative here. Grad stays on:
    # without it, attention takes a fused fast path that has no ONNX form.
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            tower.eval(),
            (example,),
            str(path),
            input_names=["input"],
            output_names=["embedding"],
            dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def _quantize(path: Path) -> None:
    """Dynamic int8: weights per output channel, activations per batch. Only the matrix
    products; the patch convolution stays fp32 (under 5% of the time, profiled). Weights use
    7 bits (reduce_range): on x86 CPUs without VNNI onnxruntime's u8 x s8 kernels can
    saturate their 16-bit pair sums, which cost ViT-B-32 cosine 0.981 -> 0.9997 here, at the
    same speed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path.with_suffix(".fp32.onnx")
    path.rename(fp32)
    with quiet_root_logger():  # it logs advice to pre-process; measured: same vectors
        quantize_dynamic(
            fp32,
            path,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
    fp32.unlink()


def _written(towers: dict[str, str], tokenizer: dict[str, Any] | None) -> list[str]:
    """Every file of the export, each verified by its sha256 before use."""
    return [*towers.values(), *([TextTokenizer.FILE] if tokenizer is not None else [])]


def _file_record(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}
