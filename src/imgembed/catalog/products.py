"""Products as they enter the catalogue: one mapping (a CSV row, a JSON object, a Shopify
product, an HTTP body) becomes a checked `ProductInput`, or a `ProductRowError` that says
what is wrong. Also the product text the text embedder sees, and its hash."""

from __future__ import annotations

import contextlib
import hashlib
import html.parser
import json
import math
import os
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from imgembed.intake.sources import is_data_uri, url_scheme
from imgembed.names import has_control

# Column names accepted for each field (case-insensitive), also as Dutch and German shops'
# exports name them; anything else is an attribute.
COLUMNS = {
    "product_id": ("product_id", "id", "sku", "handle", "artikelnummer"),
    "title": ("title", "name", "titel", "naam"),
    "description": (
        "description",
        "body_html",
        "body",
        "body (html)",
        "beschrijving",
        "omschrijving",
        "beschreibung",
    ),
    "category": ("category", "product_type", "type", "categorie", "kategorie"),
    "price": ("price", "variant price", "prijs", "preis"),
    "currency": ("currency", "valuta", "währung"),
    "image_url": ("image_url", "image", "image_src", "image src", "img", "afbeelding", "bild"),
    "extra_image_urls": ("extra_image_urls", "images", "image_urls", "afbeeldingen", "bilder"),
}


# What a row can set: a field it does not name keeps what is stored (a price-only feed
# leaves images and categories alone). The image and the extra images are one part.
MAX_ID_LENGTH = 500  # characters: up to 2,000 bytes, within an index row (2,704)
ROW_PARTS = ("title", "description", "category", "price", "currency", "images", "attributes")
FIELD_PART = {"image_url": "images", "extra_image_urls": "images"}  # fields to ROW_PARTS
_ALIASES = frozenset(name for names in COLUMNS.values() for name in names)


class ProductRowError(ValueError):
    """One input row is not a usable product; the importer reports it with its line."""


@dataclass(frozen=True)
class ProductInput:
    product_id: str
    title: str
    description: str = ""
    category: str | None = None
    price: Decimal | None = None
    currency: str | None = None
    image_url: str | None = None
    extra_image_urls: tuple[str, ...] = ()
    attributes: dict[str, Any] = field(default_factory=dict)
    given: frozenset[str] = frozenset(ROW_PARTS)  # the parts the row names (empty ones clear)

    @property
    def text(self) -> str:
        return product_text(self.title, self.description, self.category, self.price, self.currency)


def product_text(
    title: str,
    description: str | None,
    category: str | None,
    price: Decimal | float | None,
    currency: str | None,
) -> str:
    """What the text embedder sees (title first: small models truncate long texts):

        {title}
        {description}
        Category: {category}
        Price: {price} {currency}

    Lines with nothing to say are left out."""
    lines = [title.strip(), (description or "").strip()]
    if category:
        lines.append(f"Category: {category.strip()}")
    if price is not None:
        lines.append(f"Price: {Decimal(price):.2f} {currency or ''}".rstrip())
    return "\n".join(line for line in lines if line)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def from_mapping(row: Mapping[str, Any], base: Path | None = None) -> ProductInput:
    """A product from a flat mapping with the COLUMNS names (any case); other keys become
    attributes. Relative image paths are relative to `base` (the catalogue file's folder).
    The parts the mapping names are `given` (a key with an empty value clears its part)."""
    lowered = {str(k).strip().casefold(): v for k, v in row.items() if k is not None}
    fields: dict[str, Any] = {}
    used: set[str] = set()
    for name, names in COLUMNS.items():
        key = next((n for n in names if _present(lowered.get(n))), None)
        if key is not None:
            fields[name] = lowered[key]
            used.add(key)
    given = {FIELD_PART.get(name, name) for name, names in COLUMNS.items()
             if name != "product_id" and any(n in lowered for n in names)}  # fmt: skip
    if any(k not in used and (k not in _ALIASES or _present(v)) for k, v in lowered.items()):
        given.add("attributes")  # the row's other columns are all its attributes
    attributes = {k: v for k, v in lowered.items() if k not in used and _present(v)}
    attributes.update(_nested(attributes.pop("attributes", None), fields.get("product_id")))
    if isinstance(attributes.get("tags"), str):
        attributes["tags"] = split_tags(attributes["tags"])
    extra = fields.get("extra_image_urls") or ()
    if isinstance(extra, str):
        extra = [part for part in re.split(r"[\s|]+", extra) if part]
    return checked(
        product_id=fields.get("product_id"),
        title=fields.get("title"),
        description=fields.get("description"),
        category=fields.get("category"),
        price=fields.get("price"),
        currency=fields.get("currency"),
        image_url=fields.get("image_url"),
        extra_image_urls=extra,
        attributes=attributes,
        base=base,
        given=frozenset(given),
    )


def checked(
    *,
    product_id: Any,
    title: Any,
    description: Any = None,
    category: Any = None,
    price: Any = None,
    currency: Any = None,
    image_url: Any = None,
    extra_image_urls: Sequence[Any] = (),
    attributes: Mapping[str, Any] | None = None,
    base: Path | None = None,
    given: frozenset[str] = frozenset(ROW_PARTS),
) -> ProductInput:
    """A ProductInput from loose values, or ProductRowError naming the first problem.
    Relative image paths are made absolute against `base`, or the current directory."""
    product_id = _scalar(_whole(product_id), "product id", "")
    if not product_id:
        raise ProductRowError(
            "no product id (a column product_id, id, sku, handle or artikelnummer)"
        )
    title = _scalar(title, "title", product_id)
    if not title:  # as if not named: updates a stored product, refused for a new one (Catalog)
        given = given - {"title"}
    if not isinstance(attributes or {}, Mapping):
        raise ProductRowError(f"product {product_id}: attributes must be an object")
    if not isinstance(extra_image_urls, list | tuple):
        raise ProductRowError(f"product {product_id}: extra_image_urls must be a list")
    description = strip_html(_scalar(description, "description", product_id))
    category = _scalar(category, "category", product_id)
    currency = _scalar(currency, "currency", product_id)
    urls = [_scalar(u, "image_url", product_id) for u in [image_url, *extra_image_urls]]
    if len(product_id) > MAX_ID_LENGTH:  # a key of the products' index: it must fit a page
        raise ProductRowError(
            f"product {product_id[:40]}...: an id longer than {MAX_ID_LENGTH} characters"
        )
    values = [product_id, title, description, category, currency, *urls]
    values += list(_texts(attributes or {}, product_id))
    if any(has_surrogates(v) for v in values if v):
        raise ProductRowError(f"product {product_id}: text that is not valid UTF-8")
    if has_control(product_id):  # as store ids
        raise ProductRowError(
            f"product {product_id!r}: an id with a control character (a line "
            "break, a tab): HTTP routes cannot name it"
        )
    if any("\x00" in v for v in values):  # PostgreSQL text cannot hold it
        raise ProductRowError(f"product {product_id}: text with a NUL character")
    images = [_image(u, base) for u in urls if u]
    return ProductInput(
        product_id=product_id,
        title=title,
        description=description,
        category=category or None,
        price=parse_price(price, product_id),
        currency=currency.upper() or None,
        # no main image named: the first of the others is it (as Shopify's first image)
        image_url=images[0] if images else None,
        extra_image_urls=tuple(images[1:]),
        attributes=dict(attributes or {}),
        given=given,
    )


def parse_price(value: Any, product_id: str = "") -> Decimal | None:
    """29.99, "29,99", "€ 1.299,00", "1,299.00", "25,-", "EUR 12", 1e-06 -> Decimal (exactly
    the value given); empty -> None; anything else, e.g. "3 for 2", -> ProductRowError."""
    if not _present(value):
        return None
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        price = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    elif isinstance(value, str):
        price = _price_text(value, product_id)
    else:
        raise ProductRowError(f"{_who(product_id)}price {value!r} is not a number")
    if not price.is_finite():
        raise ProductRowError(f"{_who(product_id)}price {value!r} is not a number")
    if price < 0:
        raise ProductRowError(f"{_who(product_id)}price {value!r} must be 0 or more")
    if not math.isfinite(float(price)):  # shown and filtered as a float: it must be one
        raise ProductRowError(f"{_who(product_id)}price {_short(value)} is too large")
    return price


_AMOUNT = re.compile(r"[+-]?(?:\d[\d.,]*|[.,]\d+)")
_SCIENTIFIC = re.compile(r"[+-]?\d+(?:\.\d+)?[eE][+-]?\d+")


def _price_text(value: str, product_id: str) -> Decimal:
    """A price as shops write it: a currency symbol or code before or after, spaces or
    apostrophes between thousands, the last of '.' and ',' the decimal separator."""
    text = re.sub(r"^[A-Z]{3}\s*|\s*[A-Z]{3}$", "", value.strip())  # EUR 12, 12 EUR
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Sc", "Zs"))
    text = text.replace("'", "").removesuffix(",-").removesuffix(".-")  # 1'299, 25,-
    if _SCIENTIFIC.fullmatch(text):
        return Decimal(text)
    if not _AMOUNT.fullmatch(text):
        raise ProductRowError(f"{_who(product_id)}price {value!r} is not a number")
    marks = [ch for ch in text if ch in ".,"]
    if len(set(marks)) == 2:  # 1.299,00 or 1,299.00: the last one is the decimal separator
        text = text.replace("." if marks[-1] == "," else ",", "")
    elif len(marks) > 1:  # 1.299.000: thousands only
        text = text.replace(marks[0], "")
    try:
        return Decimal(text.replace(",", "."))
    except InvalidOperation:
        raise ProductRowError(f"{_who(product_id)}price {value!r} is not a number") from None


def _who(product_id: str) -> str:
    return f"product {product_id}: " if product_id else ""


def split_tags(tags: str) -> list[str]:
    return [tag.strip() for tag in tags.split(",") if tag.strip()]


class _TextOnly(html.parser.HTMLParser):
    BLOCKS = frozenset(
        {
            "p",
            "br",
            "div",
            "li",
            "ul",
            "ol",
            "tr",
            "td",
            "th",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "section",
            "article",
            "table",
            "hr",
        }
    )
    HIDDEN = frozenset({"script", "style", "template"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self._hidden += tag in self.HIDDEN
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        self._hidden -= tag in self.HIDDEN and self._hidden > 0
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """Visible text of HTML (Shopify's body_html): tags and scripts dropped, entities
    decoded, blocks on their own lines, whitespace collapsed."""
    if "<" not in text and "&" not in text:
        return " ".join(text.split())
    parser = _TextOnly()
    parser.feed(text)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def _image(value: Any, base: Path | None) -> str:
    source = _text(value)
    if url_scheme(source) or is_data_uri(source):  # ftp://: refused as written
        return source
    # relative to the catalogue file, or to where the library runs: stored absolute, so
    # that an embed run from another directory finds it
    return os.path.abspath(source if base is None else base / source)


def _nested(value: Any, product_id: Any) -> Mapping[str, Any]:
    """An `attributes` object; in a CSV, its cell holds the object as JSON text."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError, RecursionError):
            value = json.loads(value)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        who = _who(product_id if isinstance(product_id, str) else "")
        raise ProductRowError(f'{who}attributes must be an object, as {{"color": "red"}}')
    return value


def _whole(value: Any) -> Any:
    """An id given as a whole number in a float's form (JSON's 1.0, -0.0, 1e20; a pandas
    export of ids) is that number, as written without the fraction: "1", "0",
    "100000000000000000000", the product an id of 1 (or -0, read as 0) names too; other
    numbers are kept as written ("7.5")."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(Decimal(repr(value)))  # repr's digits: 1e20 is 1 and 20 zeros
    return value


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _scalar(value: Any, what: str, product_id: str) -> str:
    """A field's text: a JSON list or object would otherwise be stored as its Python repr, and
    JSON's NaN or Infinity as "nan" or "inf" (as an id, every such row one product)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal | None):
        kind = type(value).__name__
        raise ProductRowError(f"{_who(product_id)}{what} must be text or a number, not a {kind}")
    if isinstance(value, float | Decimal) and not Decimal(value).is_finite():
        raise ProductRowError(f"{_who(product_id)}{what} is {value} (not a number)")
    return _text(value)


def _present(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list | tuple | dict):
        return bool(value)
    return value is not None


def has_surrogates(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)  # undecodable bytes, lone halves


def _texts(value: Any, product_id: str) -> Iterator[str]:
    """The texts in attributes (keys too), or ProductRowError for a number JSON cannot hold."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield str(key)
            yield from _texts(item, product_id)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _texts(item, product_id)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ProductRowError(f"product {product_id}: an attribute is {value} (not a number)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
