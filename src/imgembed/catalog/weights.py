"""Category weights: how much of a product's score comes from its image and how much from its
text. The Findly table is the default; a TOML or JSON file (IMGEMBED_CATEGORY_WEIGHTS) adds
categories and aliases or replaces entries of the same name:

    default = "general"                      # optional: the category of unknown categories
    [categories.fashion]
    image = 0.8
    text = 0.2
    aliases = ["kleding", "mode"]

Weights of a category add up to 1, so that scores of products in different categories are
comparable (each is a weighted mean of two cosines)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgembed.errors import CategoryWeightsError, ConfigurationError

log = logging.getLogger("imgembed.catalog")


@dataclass(frozen=True)
class Weights:
    image: float
    text: float


# The Findly table: visual products lean on the image, mixed ones less so.
FINDLY_CATEGORIES = {
    "fashion": Weights(0.75, 0.25),
    "interior": Weights(0.75, 0.25),
    "jewellery": Weights(0.55, 0.45),
    "tech": Weights(0.55, 0.45),
    "general": Weights(0.60, 0.40),
}
FINDLY_ALIASES = {
    "fashion": ("kleding", "mode", "clothing", "clothes", "apparel", "shoes", "schoenen",
                "bags", "tassen", "kleidung", "bekleidung", "schuhe"),
    "interior": ("interieur", "wonen", "meubels", "furniture", "home", "decor", "woondecoratie",
                 "homeware", "lighting", "verlichting", "einrichtung", "möbel", "wohnen"),
    "jewellery": ("jewelry", "sieraden", "juwelen", "schmuck", "watches", "horloges", "uhren"),
    "tech": ("technology", "electronics", "elektronica", "elektronik", "techniek", "gadgets",
             "computers", "phones", "telefoons"),
    "general": ("algemeen", "allgemein", "other", "overig", "default"),
}  # fmt: skip
DEFAULT_CATEGORY = "general"


def _normal(name: str) -> str:
    return " ".join(name.casefold().split())


@dataclass(frozen=True)
class WeightsTable:
    categories: Mapping[str, Weights]
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias -> category
    default: str = DEFAULT_CATEGORY

    def __post_init__(self) -> None:
        for name, weights in self.categories.items():
            if not (0 <= weights.image <= 1 and 0 <= weights.text <= 1):
                raise ConfigurationError(f"category {name!r}: weights must lie in [0, 1]")
            if abs(weights.image + weights.text - 1) > 1e-6:
                raise ConfigurationError(
                    f"category {name!r}: image {weights.image} + text {weights.text} must add "
                    "up to 1 (so that scores of different categories are comparable)"
                )
        for alias, target in self.aliases.items():
            if target not in self.categories:
                raise ConfigurationError(f"alias {alias!r} names no category ({target!r})")
            if alias in self.categories and alias != target:
                raise ConfigurationError(f"alias {alias!r} is also a category name")
        if self.default not in self.categories:
            raise ConfigurationError(f"default category {self.default!r} is not in the table")

    def key(self, category: str | None) -> str:
        """The table's category for a product's category (see `category_of`), else the default."""
        return self.category_of(category) or self.default

    def category_of(self, category: str | None) -> str | None:
        """The table's category a name stands for: its name or alias (any case), else the
        first word of it that is one ("Dames kleding" -> fashion); None if none is."""
        if not category or not category.strip():
            return None
        name = _normal(category)
        found = self._lookup(name)
        if found is None:
            found = next(filter(None, map(self._lookup, re.split(r"[\W_]+", name))), None)
        return found

    def _lookup(self, name: str) -> str | None:
        if name in self.categories:
            return name
        return self.aliases.get(name)

    def weights(self, category: str | None) -> tuple[str, Weights]:
        key = self.key(category)
        return key, self.categories[key]

    def to_dict(self) -> dict[str, Any]:
        return {
            "default": self.default,
            "categories": {
                name: {
                    "image": w.image,
                    "text": w.text,
                    "aliases": sorted(a for a, t in self.aliases.items() if t == name),
                }
                for name, w in sorted(self.categories.items())
            },
        }

    @property
    def version(self) -> str:
        """Fingerprint of the table: recorded with every fused vector."""
        canonical = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def findly_table() -> WeightsTable:
    aliases = {alias: name for name, names in FINDLY_ALIASES.items() for alias in names}
    return WeightsTable(dict(FINDLY_CATEGORIES), aliases)


def load_weights(path: Path | None) -> WeightsTable:
    """The Findly table, with a TOML/JSON file's categories and aliases over it."""
    table = findly_table()
    if path is None:
        return table
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:  # JSON and TOML errors are ValueErrors
        raise CategoryWeightsError(f"cannot read category weights {path}: {exc}") from exc
    try:
        return _merge(table, data, path)
    except ConfigurationError as exc:  # the file's, whoever reads it (a server: not a request)
        message = str(exc)
        named = message if message.startswith(f"{path}:") else f"{path}: {message}"
        raise CategoryWeightsError(named) from exc


def _merge(table: WeightsTable, data: Any, path: Path) -> WeightsTable:
    if not isinstance(data, dict) or set(data) - {"default", "categories"}:
        raise ConfigurationError(f"{path}: expected keys 'categories' and optionally 'default'")
    categories = dict(table.categories)
    aliases = dict(table.aliases)
    entries = data.get("categories", {})
    if not isinstance(entries, dict):
        raise ConfigurationError(f"{path}: 'categories' must be a table of categories")
    claimed: dict[str, set[str]] = {}  # aliases the file gives, to which categories
    for raw_name, entry in entries.items():
        name = _normal(raw_name)
        if not isinstance(entry, dict) or set(entry) - {"image", "text", "aliases"}:
            raise ConfigurationError(
                f"{path}: category {raw_name!r} takes 'image', 'text' and 'aliases'"
            )
        try:
            categories[name] = Weights(float(entry["image"]), float(entry["text"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"{path}: category {raw_name!r} needs numeric 'image' and 'text' weights"
            ) from exc
        given = entry.get("aliases", [])
        # a string would be taken letter by letter ("toys": t, o, y, s), never as itself;
        # numbers are names too (category codes such as 123)
        names = (str, int)
        if not isinstance(given, list) or not all(
            isinstance(a, names) and not isinstance(a, bool) for a in given
        ):
            raise ConfigurationError(
                f"{path}: category {raw_name!r}: 'aliases' must be a list of names "
                f'(aliases = ["kleding", "mode"]), not {given!r}'
            )
        aliases.pop(name, None)  # a category of its own now
        for alias in map(_normal, map(str, given)):
            before = aliases.get(alias)
            if before != name and before in claimed.get(alias, ()):
                raise ConfigurationError(
                    f"{path}: alias {alias!r} is given to both {before!r} and {name!r}"
                )
            if before is not None and before != name:  # intended, perhaps: say it
                log.warning("%s: alias %r now names %r, not %r", path, alias, name, before)
            aliases[alias] = name
            claimed.setdefault(alias, set()).add(name)
    default = _normal(str(data.get("default", table.default)))
    return WeightsTable(categories, aliases, default)
