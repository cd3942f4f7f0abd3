"""Loading open_clip models through open_clip's own factory: one instance per
(model, weights, device, precision) per process, loaded lazily, shared between threads."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from open_clip.pretrained import get_pretrained_cfg

from imgembed.errors import ConfigurationError, ModelUnavailableError, UnknownModelError
from imgembed.models import registry
from imgembed.models.registry import ModelRef

open_clip = registry.open_clip()

log = logging.getLogger(__name__)

HUB_PROBE_SECONDS = 3.0
_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str, str, str, str], LoadedModel] = {}


@dataclass(frozen=True)
class LoadedModel:
    ref: ModelRef
    model: torch.nn.Module
    tokenizer: Any
    preprocess_cfg: dict[str, Any]
    device: torch.device
    dimension: int
    weights_id: str  # changes whenever the weights change; part of every cache key


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigurationError(
            f"invalid device {device!r}: use cpu, cuda, cuda:N or auto"
        ) from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise ConfigurationError(
                f"device {device!r} requested but torch sees {count} CUDA device(s); "
                "set IMGEMBED_DEVICE=cpu or auto (--device; in a seed config, leave out "
                "gpu_device: use_gpu alone means the GPU when there is one)"
            )
    elif resolved.type != "cpu":
        raise ConfigurationError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or auto")
    return resolved


def load_model(
    ref: ModelRef,
    device: str = "auto",
    precision: str = "fp32",
    cache_dir: Path | None = None,
    shared: bool = True,
) -> LoadedModel:
    """The shared model instance for these settings, loading it on first use; with
    shared=False a private one that is freed with its last reference (e.g. after an export)."""
    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigurationError(
            f"precision {precision!r} is not available on the torch runtime (fp32, fp16, bf16)"
        )
    torch_device = resolve_device(device)
    if precision == "fp16" and torch_device.type == "cpu":
        raise ConfigurationError("fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    registry.check_weights_there(ref)
    weights_id = registry.weights_id(ref)
    if not shared:
        return _load(ref, torch_device, precision, cache_dir, weights_id)
    # The weights' identity is part of the key: a checkpoint replaced on disk loads anew.
    key = (ref.name, ref.pretrained, weights_id, str(torch_device), precision)
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = _load(ref, torch_device, precision, cache_dir, weights_id)
        return _LOADED[key]


def _load(
    ref: ModelRef, device: torch.device, precision: str, cache_dir: Path | None, weights_id: str
) -> LoadedModel:
    dimension = registry.facts(ref.name).dimension
    tag_cfg = get_pretrained_cfg(ref.name, ref.pretrained) if ref.seed is None else {}
    if ref.seed is None and not tag_cfg and not ref.is_file and not ref.carries_config:
        tags = open_clip.list_pretrained_tags_by_model(ref.name)
        # a wrong name (retrying will not help), not weights that could not be had
        raise UnknownModelError(
            f"{ref}: {ref.pretrained!r} is neither a pretrained tag of {ref.name} "
            f"(known: {', '.join(tags) or 'none'}) nor a checkpoint file "
            f"({', '.join(registry.CHECKPOINT_SUFFIXES)})"
            + ("" if tags else "; random weights for tests: seed:N, e.g. --pretrained seed:0")
        )
    kwargs: dict[str, Any] = {
        "precision": precision,
        "device": device,
        "cache_dir": str(cache_dir) if cache_dir else None,
        # open_clip 3 builds e.g. ViT-B-32 with GELU even for QuickGELU-trained tags such as
        # `openai` (it only warns); follow the tag so vectors match the original weights.
        "force_quick_gelu": bool(tag_cfg.get("quick_gelu", False)),
    }
    log.info("loading %s on %s (%s)", ref, device, precision)
    hub_problem = None
    # open_clip logs what it then raises (and warns about seeded random weights, which are
    # the point of `seed:N`); our exception carries the message instead.
    with quiet_root_logger():
        try:
            if ref.seed is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(ref.seed)
                    model = open_clip.create_model(ref.name, pretrained=None, **kwargs)
            else:
                pretrained = None if ref.carries_config else ref.pretrained
                local = ref.is_file or ref.local_dir is not None
                hub = contextlib.nullcontext() if local else _offline_unless_hub_reachable()
                with hub as hub_problem:
                    model = open_clip.create_model(ref.name, pretrained=pretrained, **kwargs)
        except Exception as exc:  # open_clip raises RuntimeError/OSError/HF errors alike
            message = _unavailable_message(ref, tag_cfg, cache_dir, exc, hub_problem)
            raise ModelUnavailableError(message) from exc
    model.eval()
    tokenizer = open_clip.get_tokenizer(ref.name)
    if dimension is None:  # hub/local-dir configs: ask the model itself, whatever its class
        with torch.inference_mode():
            dimension = int(model.encode_text(tokenizer([""]).to(device)).shape[-1])
    return LoadedModel(
        ref=ref,
        model=model,
        tokenizer=tokenizer,
        preprocess_cfg=dict(open_clip.get_model_preprocess_cfg(model)),
        device=device,
        dimension=dimension,
        weights_id=weights_id,
    )


@contextlib.contextmanager
def _offline_unless_hub_reachable() -> Iterator[str | None]:
    """Without a route to the hub, huggingface_hub retries with backoff for about a minute
    per file before giving up. Probe once; if unreachable, use the local cache only, which
    either has the weights or fails at once. Yields why the hub was not used, if it wasn't."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        yield "HF_HUB_OFFLINE is set"
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        yield None  # a direct probe says nothing about a proxied route
        return
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        constants.HF_HUB_OFFLINE = True
        try:
            yield f"{constants.ENDPOINT} is not reachable ({exc})"
        finally:
            constants.HF_HUB_OFFLINE = False
        return
    yield None


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def _unavailable_message(
    ref: ModelRef,
    tag_cfg: dict[str, Any],
    cache_dir: Path | None,
    exc: Exception,
    hub_problem: str | None,
) -> str:
    if ref.local_dir is not None:  # the folder names its own architecture
        return (
            f"cannot load {ref}: {exc}\n{ref.local_dir} is there but does not load: a "
            "local-dir: folder holds open_clip_config.json and the weights "
            "(open_clip_model.safetensors, open_clip_pytorch_model.bin, ...), whole."
        )
    if ref.is_file:  # the weights are there: they do not fit
        return (
            f"cannot load weights for {ref}: {exc}\n"
            f"{ref.pretrained} is there but does not load as {ref.name}: a checkpoint holds the "
            "weights of one architecture (name that one with IMGEMBED_MODEL or --model; "
            "`imgembed models list` shows them), and a file cut short or damaged does not load."
        )
    from huggingface_hub import constants

    where = cache_dir or constants.HF_HUB_CACHE
    repo = tag_cfg.get("hf_hub", "").rstrip("/")
    offline = f" only ({hub_problem})" if hub_problem else ""
    lines = [
        f"cannot load weights for {ref}: {exc}",
        f"Looked in the Hugging Face cache at {where}{offline}"
        + (f" for the repository {repo}." if repo else "."),
        "To supply the weights, any of:",
        "  - run once where the Hugging Face hub is reachable; the weights are cached there",
        "    (set IMGEMBED_MODEL_CACHE_DIR or HF_HOME to choose the cache directory),",
        "  - copy such a cache directory to this machine and point HF_HOME or",
        "    IMGEMBED_MODEL_CACHE_DIR at it,",
        "  - or download the checkpoint file (.safetensors/.bin/.pt) and set",
        "    IMGEMBED_PRETRAINED=/path/to/file with IMGEMBED_MODEL=" + ref.name + ".",
    ]
    return "\n".join(lines)
