"""Catalogue files into products: CSV, JSON lines, and Shopify's `products.json`
(`{"products": [...]}` or a plain list). A bad row is reported with its line in the file and
skipped; it never stops the rest. Shopify products: body_html -> description (HTML
stripped), product_type -> category, the lowest variant price (Shopify's "from" price),
images[].src by position -> image_url + extra_image_urls, vendor/handle/tags -> attributes."""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import reprlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgembed.catalog.products import (
    ProductInput,
    ProductRowError,
    checked,
    from_mapping,
    parse_price,
    split_tags,
)
from imgembed.errors import ConfigurationError
from imgembed.indexing.sources import csv_delimiter, csv_reader
from imgembed.names import printable

TOO_DEEP = "nested too deeply to read"  # json's recursion limit: no product is like that
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "shopify"}


@dataclass(frozen=True)
class BadRow:
    line: int
    message: str

    def __post_init__(self) -> None:
        # a message may quote a row's text: valid UTF-8 for JSON and terminals, also when
        # that text holds a lone surrogate (a JSON "\\ud800" escape, an undecodable byte)
        object.__setattr__(self, "message", printable(self.message))

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class ParsedCatalogue:
    path: Path
    format: str
    products: list[tuple[int, ProductInput]] = field(default_factory=list)  # (line, product)
    bad_rows: list[BadRow] = field(default_factory=list)
    rows: int = 0  # rows read: good and bad (an empty file has none, and one bad row)
    encoding: str = "utf-8"


def read_catalogue(path: Path, format: str | None = None) -> ParsedCatalogue:
    path = Path(path)
    kind = format or FORMATS.get(path.suffix.lower())
    if format is not None and format not in FORMATS.values():
        raise ConfigurationError(f"unknown catalogue format {format!r}: use csv, jsonl or shopify")
    if kind not in FORMATS.values():
        raise ConfigurationError(
            f"{path}: unknown catalogue format; use .csv, .jsonl or .json (Shopify), "
            "or name one with --format csv|jsonl|shopify"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from exc
    text, encoding = _text(path, raw, kind)
    _check_kind(path, kind, text)
    parsed = ParsedCatalogue(path, kind, encoding=encoding)
    rows = {"csv": _csv_rows, "jsonl": _jsonl_rows, "shopify": _json_rows}[kind](text)
    for line, row in rows:
        if isinstance(row, BadRow):
            parsed.bad_rows.append(row)
            continue
        try:
            parsed.products.append((line, product(row, path.parent)))
        except ProductRowError as exc:
            parsed.bad_rows.append(BadRow(line, str(exc)))
    parsed.rows = len(parsed.products) + len(parsed.bad_rows)
    parsed.products = first_of_each(parsed.products, parsed.bad_rows)
    parsed.bad_rows.sort(key=lambda row: row.line)
    if not parsed.rows:  # an export that failed half-way must not pass as "imported"
        parsed.bad_rows.append(BadRow(1, "no products in this file (empty, or a header only)"))
    return parsed


# A byte that starts a UTF-8 sequence and one that continues it: UTF-8 text beyond ASCII.
_UTF8_PAIR = re.compile(rb"[\xc2-\xf4][\x80-\xbf]")


def _text(path: Path, raw: bytes, kind: str) -> tuple[str, str]:
    """The text and its encoding: UTF-8 (a BOM dropped), or UTF-16 with its BOM (Excel's
    "Unicode text" export) or without (mostly ASCII, so every other byte is 0), or for a CSV
    with not one UTF-8 sequence, Windows-1252 (Excel's plain CSV in Dutch or German:
    "Währung" as W, 0xE4, h). Bytes that are not UTF-8 in a UTF-8 file survive as
    surrogates; the rows holding them are reported."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError as exc:
            raise ConfigurationError(f"{path}: starts as UTF-16 but is not: {exc}") from exc
    if b"\x00" in raw:  # no text file holds NUL, but UTF-16 without its BOM (mostly ASCII)
        for encoding, zeros in (("utf-16-le", raw[1::2]), ("utf-16-be", raw[0::2])):
            if zeros.count(0) > len(zeros) // 2:
                try:
                    return raw.decode(encoding), encoding
                except UnicodeDecodeError:
                    break
        try:  # UTF-8 text with a stray NUL: the rows holding it are reported, as before
            return raw.decode("utf-8").removeprefix("\ufeff"), "utf-8"
        except UnicodeDecodeError:
            raise ConfigurationError(
                f"{path}: not a text file (it holds NUL bytes): save it as CSV or JSON, UTF-8"
            ) from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff"), "utf-8"
    except UnicodeDecodeError:
        pass
    if kind == "csv" and not _UTF8_PAIR.search(raw):
        return raw.decode("cp1252", errors="surrogateescape"), "windows-1252"
    return raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff"), "utf-8"


def _check_kind(path: Path, kind: str, text: str) -> None:
    """A file in another format than the one named is refused as a whole: read as the wrong
    one, every row would be reported bad and the cause would go unsaid."""
    starts = [line.lstrip()[:1] for line in text.splitlines() if line.strip()]
    if not starts:
        return  # empty: reported as a file with no products
    if kind == "csv" and starts[0] in "{[":
        raise ConfigurationError(
            f"{path} holds JSON, not CSV: use --format jsonl (one product per line) "
            "or --format shopify (products.json)"
        )
    if kind == "jsonl" and "{" not in starts:
        raise ConfigurationError(
            f"{path}: no line is a JSON object, so it is not JSON lines; "
            "use --format csv, or --format shopify for one JSON document"
        )
    if kind == "shopify" and starts[0] not in "{[":
        raise ConfigurationError(
            f"{path} is not a JSON document (it starts with {text.lstrip()[:20]!r}); "
            "use --format csv or --format jsonl"
        )


def first_of_each(
    products: list[tuple[int, ProductInput]], bad_rows: list[BadRow]
) -> list[tuple[int, ProductInput]]:
    """The first row of each product id; a later one becomes a bad row naming the first
    (both would count as imported, the last silently winning)."""
    first: dict[str, int] = {}
    kept = []
    for line, item in products:
        if item.product_id in first:
            message = f"product {item.product_id}: the same id as line {first[item.product_id]}"
            bad_rows.append(BadRow(line, message + ", which is kept"))
        else:
            first[item.product_id] = line
            kept.append((line, item))
    return kept


def product(row: Any, base: Path | None = None) -> ProductInput:
    """A product from a flat mapping or a Shopify product object, or ProductRowError for
    anything else: the row is untrusted input, whatever it breaks is that row's error."""
    if not isinstance(row, Mapping):  # e.g. a JSON request's list holding a string
        raise ProductRowError(f"not a product object but {reprlib.repr(row)}")
    try:
        return from_shopify(row, base) if _is_shopify(row) else from_mapping(row, base)
    except ProductRowError:
        raise
    except Exception as exc:
        raise ProductRowError(f"cannot read this product: {exc!r}") from exc


def _is_shopify(row: Mapping[str, Any]) -> bool:
    """Shopify's own structures: variants, image objects. A `body_html` column alone is a
    flat row's description (its category, price and image columns would be lost)."""
    images = row.get("images")
    return (
        isinstance(row.get("variants"), list)
        or isinstance(row.get("image"), Mapping)
        or (isinstance(images, list) and any(isinstance(i, Mapping) for i in images))
    )


def from_shopify(item: Mapping[str, Any], base: Path | None = None) -> ProductInput:
    raw_id = item.get("id") or item.get("handle")
    # for messages until checked() refuses an id that is not text or a number
    product_id = str(raw_id).strip() if isinstance(raw_id, str | int | float) else ""
    variants = [v for v in _listed(item, "variants", product_id) if isinstance(v, Mapping)]
    prices = [parse_price(v.get("price"), product_id) for v in variants]
    known = [p for p in prices if p is not None]
    images = [
        i for i in _listed(item, "images", product_id) if isinstance(i, Mapping) and i.get("src")
    ]
    sources = [i["src"] for i in sorted(images, key=_position)]
    if not sources and isinstance(item.get("image"), Mapping) and item["image"].get("src"):
        sources = [item["image"]["src"]]
    tags = item.get("tags")
    attributes: dict[str, Any] = {
        key: item[key] for key in ("vendor", "handle", "status") if item.get(key)
    }
    if tags:
        attributes["tags"] = (
            split_tags(tags) if isinstance(tags, str) else _listed(item, "tags", product_id)
        )
    given = frozenset(p for p, keys in _SHOPIFY_PARTS.items() if any(k in item for k in keys))
    return checked(
        product_id=raw_id,
        title=item.get("title"),
        description=item.get("body_html"),
        category=item.get("product_type"),
        price=min(known) if known else None,
        currency=item.get("currency") or _variant_currency(variants),
        image_url=sources[0] if sources else None,
        extra_image_urls=sources[1:],
        attributes=attributes,
        base=base,
        given=given,
    )


# The keys of a Shopify product that set each part: a price sync sends {"id", "title",
# "variants"}, and what it leaves out is kept.
_SHOPIFY_PARTS = {
    "title": ("title",),
    "description": ("body_html",),
    "category": ("product_type",),
    "price": ("variants",),
    "currency": ("currency", "variants"),
    "images": ("images", "image"),
    "attributes": ("vendor", "handle", "status", "tags"),
}


def _listed(item: Mapping[str, Any], key: str, product_id: str) -> list[Any]:
    """A Shopify field that holds a list: [] when empty or absent, else ProductRowError."""
    value = item.get(key)
    if not value:
        return []
    if not isinstance(value, list):
        raise ProductRowError(
            f"product {product_id}: {key} must be a list, not {reprlib.repr(value)}"
        )
    return value


def _position(image: Mapping[str, Any]) -> float:
    position = image.get("position")
    return position if isinstance(position, int | float) and position is not True else 0


def _variant_currency(variants: list[Mapping[str, Any]]) -> str | None:
    # The Admin API lists prices per presentment currency; the first is the shop's own.
    for variant in variants:
        entries = variant.get("presentment_prices")
        for entry in entries if isinstance(entries, list) else []:
            price = entry.get("price") if isinstance(entry, Mapping) else None
            if isinstance(price, Mapping) and price.get("currency_code"):
                return str(price["currency_code"])
    return None


Row = tuple[int, Mapping[str, Any] | BadRow]


def _csv_rows(text: str) -> Iterator[Row]:
    lines = io.StringIO(text, newline="").readlines()  # the lines csv counts in line_num
    delimiter = csv_delimiter(text)
    header: list[str] | None = None
    first = 0  # the line (0-based) the current reader starts on
    while first < len(lines):
        reader = csv_reader(iter(lines[first:]), delimiter)
        restart = None
        while True:
            line = first + reader.line_num + 1  # where the next record starts
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                yield line, BadRow(line, f"not valid CSV: {exc}")
                continue
            end = first + reader.line_num
            if end == len(lines) and _unclosed(lines[line - 1 :], delimiter):
                # a stray quote: the rest of the file would be one field of this row
                yield line, BadRow(line, "a quote opened in this row is never closed")
                restart = line  # the rows after it are read on their own
                break
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header = [name.strip() for name in fields]
                named = [name.casefold() for name in header if name]
                if twice := sorted({n for n in named if named.count(n) > 1}):
                    # one value would silently win over the other: the file is not read
                    yield line, BadRow(line, f"the header names {', '.join(twice)} more than "
                                             "once; rename or remove one")  # fmt: skip
                    return
                continue
            if len(fields) > len(header):
                yield line, BadRow(line, f"{len(fields)} fields, but the header has {len(header)}")
                continue
            # a row cut short (exporters drop empty trailing fields) has those columns empty,
            # as a row that writes them empty: the header names them for the whole file
            padded = fields + [""] * (len(header) - len(fields))
            yield line, dict(zip(header, padded, strict=True))
        if restart is None:
            return
        first = restart


def _unclosed(record: list[str], delimiter: str) -> bool:
    """Whether this last record runs to the end of the file inside quotes."""
    try:
        for _ in csv_reader(iter(record), delimiter, strict=True):
            pass
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False


def _jsonl_rows(text: str) -> Iterator[Row]:
    for line, content in enumerate(text.splitlines(), 1):
        content = content.removeprefix("\ufeff")  # files joined with `cat`: each had one
        if not content.strip():
            continue
        try:
            row = json.loads(content)
        except json.JSONDecodeError as exc:
            yield line, BadRow(line, f"not valid JSON: {exc.msg}")
            continue
        except RecursionError:
            yield line, BadRow(line, f"not valid JSON: {TOO_DEEP}")
            continue
        yield line, row if isinstance(row, dict) else BadRow(line, "not a JSON object")


def _json_rows(text: str) -> Iterator[Row]:
    """The products of a Shopify `products.json` (or a JSON list), each with the line it
    starts on. A syntax error ends the file there: what came before is kept."""
    walker = _Walker(text)
    try:
        for line, row in walker.items():
            yield line, row if isinstance(row, dict) else BadRow(line, "not a JSON object")
    except json.JSONDecodeError as exc:
        yield exc.lineno, BadRow(exc.lineno, f"not valid JSON ({exc.msg}); the rest is skipped")
    except RecursionError:
        line = walker.line  # where the last product that was read started
        yield line, BadRow(line, f"not valid JSON ({TOO_DEEP}); the rest is skipped")


class _Walker:
    """Walks `{"products": [...]}`, `[...]` or `{"product": {...}}` element by element with
    json's raw_decode, so each product's line number is known (json.loads gives none)."""

    def __init__(self, text: str):
        self.text = text
        self.decoder = json.JSONDecoder()
        self._pos = 0  # line counting is incremental: files can be large
        self._line = 1

    @property
    def line(self) -> int:
        return self._line

    def line_at(self, pos: int) -> int:
        self._line += self.text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line

    def skip(self, pos: int) -> int:
        while pos < len(self.text) and self.text[pos] in " \t\r\n":
            pos += 1
        return pos

    def fail(self, message: str, pos: int) -> json.JSONDecodeError:
        return json.JSONDecodeError(message, self.text, pos)

    def items(self) -> Iterator[tuple[int, Any]]:
        pos = self.skip(0)
        if self.text.startswith("{", pos):
            key, pos = self._products(pos)
            if key == "product":  # Shopify's GET /products/{id}.json: one product
                yield self.line_at(pos), self.decoder.raw_decode(self.text, pos)[0]
                return
        if not self.text.startswith("[", pos):
            raise self.fail('expected {"products": [...]} or a list of products', pos)
        pos = self.skip(pos + 1)
        if self.text.startswith("]", pos):
            return
        while True:
            line = self.line_at(pos)
            value, pos = self.decoder.raw_decode(self.text, pos)
            yield line, value
            pos = self.skip(pos)
            if self.text.startswith("]", pos):
                return
            if not self.text.startswith(",", pos):
                raise self.fail("expected ',' or ']' after a product", pos)
            pos = self.skip(pos + 1)

    def _products(self, pos: int) -> tuple[str, int]:
        """Where the value of "products" (a list) or "product" (one) starts."""
        pos = self.skip(pos + 1)
        while not self.text.startswith("}", pos):
            key, pos = self.decoder.raw_decode(self.text, pos)
            pos = self.skip(pos)
            if not isinstance(key, str) or not self.text.startswith(":", pos):
                raise self.fail("expected a key and ':'", pos)
            pos = self.skip(pos + 1)
            if key in ("products", "product"):
                return key, pos
            _, pos = self.decoder.raw_decode(self.text, pos)
            pos = self.skip(pos)
            if self.text.startswith(",", pos):
                pos = self.skip(pos + 1)
        raise self.fail('no "products" list (or one "product") in the object', pos)
