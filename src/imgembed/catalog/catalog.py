"""The Catalog: products per store, their fused embeddings and their search. Every catalogue
policy lives in its methods; the CLI and the HTTP service only translate to and from them."""

from __future__ import annotations

import logging
import shlex
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from imgembed.catalog import fusion, importer, jobs, search
from imgembed.catalog.products import (
    MAX_ID_LENGTH,
    ProductInput,
    ProductRowError,
    has_surrogates,
    parse_price,
    product_text,
)
from imgembed.catalog.records import StoreProvenance
from imgembed.catalog.repository import ProductRepository
from imgembed.catalog.text import TextEmbedder, create_text_embedder, spec_for
from imgembed.catalog.weights import WeightsTable, load_weights
from imgembed.config import Settings, load_settings
from imgembed.engine import similarity
from imgembed.errors import (
    CollectionNotFoundError,
    ConfigurationError,
    InvalidRecordError,
    ProductNotFoundError,
    ProvenanceMismatchError,
)
from imgembed.intake.image_input import Input
from imgembed.names import has_control, printable
from imgembed.service import ImageEmbeddingService
from imgembed.store.base import each_on_refusal, never_stored

log = logging.getLogger(__name__)
_IMPORT_CHUNK = 1000  # products per transaction: a killed import keeps what it wrote


@dataclass
class ImportReport:
    store_id: str
    source: str
    format: str
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    bad_rows: list[importer.BadRow] = field(default_factory=list)
    duration: float = 0.0
    # Ids of the accepted products, when given as objects (for a follow-up embed of them).
    product_ids: list[str] = field(default_factory=list)
    encoding: str | None = None  # a file's: utf-8, utf-16 or windows-1252

    def to_dict(self) -> dict[str, Any]:
        data = {**asdict(self), "bad_rows": [asdict(b) for b in self.bad_rows]}
        for unset in ("product_ids", "encoding"):
            if not data[unset]:
                del data[unset]
        return data


@dataclass
class StoreStats:
    store_id: str
    total: int
    embedded: int
    failed: int
    pending: int
    text_only: int  # embedded without an image
    without_image_url: int
    to_embed: int  # what `catalog embed` would process now
    categories: dict[str, int]
    errors: dict[str, int]
    last_embedded_at: str | None
    provenance: dict[str, Any] | None
    weights_version: str | None  # the table the store's last run used
    current_weights_version: str
    # parts searched exactly until the next embed run's end builds their index (a stopped
    # bulk run dropped it)
    indexes_missing: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Catalog:
    """Products per store with text + image embeddings fused by category.

    Built like ImageEmbeddingService (Settings, a seed-style dict and/or keyword overrides,
    else IMGEMBED_* variables), or around an existing service. Models load on first use."""

    def __init__(
        self,
        config: Settings | dict[str, Any] | None = None,
        *,
        service: ImageEmbeddingService | None = None,
        weights: WeightsTable | None = None,
        text_embedder: TextEmbedder | None = None,
        **overrides: Any,
    ):
        if service is not None and (config is not None or overrides):
            raise ConfigurationError("give a Catalog either a service or settings, not both")
        self._owns_service = service is None
        self.service = service or ImageEmbeddingService(config, **overrides)
        self.settings = self.service.settings
        self.weights = weights or load_weights(self.settings.category_weights)
        self._text_embedder = text_embedder
        self._repository: ProductRepository | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_store(
        cls, store_id: str, config: Settings | dict[str, Any] | None = None, **overrides: Any
    ) -> Catalog:
        """A catalogue with the models the store was embedded with, for whatever the settings
        do not name explicitly (arguments or environment): re-runs and searches then match."""
        settings = load_settings(config, **overrides)
        repository = ProductRepository.for_settings(settings)
        try:
            recorded = repository.provenance(_store(store_id))
        finally:
            repository.close()
        return cls(store_settings(settings, recorded[0] if recorded else None))

    # -- parts, built lazily ----------------------------------------------------------------

    @property
    def text_embedder(self) -> TextEmbedder:
        with self._lock:
            if self._text_embedder is None:
                self._text_embedder = create_text_embedder(self.settings, self.service)
            return self._text_embedder

    @property
    def repository(self) -> ProductRepository:
        with self._lock:
            if self._repository is None:
                self._repository = ProductRepository.for_settings(self.settings)
            return self._repository

    def provenance(self) -> StoreProvenance:
        """What this catalogue's vectors are (loads both models)."""
        image = self.service.provenance
        text = self.text_embedder
        return StoreProvenance(
            image.model,
            image.pretrained,
            image.preprocess,
            image.dimension,
            text.name,
            text.dimension(),
        )

    def _image_provenance(self, recorded: StoreProvenance) -> StoreProvenance:
        """The recorded provenance with this catalogue's image model (loads it alone)."""
        image = self.service.provenance
        return replace(
            recorded,
            image_model=image.model,
            image_pretrained=image.pretrained,
            image_preprocess=image.preprocess,
            image_dimension=image.dimension,
        )

    # -- the Findly document's functions ----------------------------------------------------

    def generate_image_embedding(self, image_url: Input) -> list[float]:
        """The image's unit embedding (an http(s) URL with retries, or a path, bytes, ...);
        raises the typed error if it cannot be had."""
        log.debug("[IMAGE] Generating image embedding for: %s", image_url)
        return self.service.embed_image(image_url).tolist()

    def generate_text_embedding(self, text: str) -> list[float]:
        """The text's unit embedding from the text model (the `text_emb` of a product)."""
        if not isinstance(text, str):  # a str's letters, or a list, would be a vector each
            raise ConfigurationError(f"the text must be a str, not {type(text).__name__}")
        vector = self.text_embedder.embed([text])[0]
        # the document's own debug lines, word for word (users grep for them)
        log.debug("[TEXT] Generated text-only embedding (length: %d)", vector.shape[0])
        return vector.tolist()

    def generate_embedding(
        self,
        title: str,
        description: str | None = None,
        category: str | None = None,
        price: float | Decimal | None = None,
        image_url: Input | None = None,
        currency: str | None = None,
    ) -> list[float]:
        """The product's combined vector `[w_img * img ; w_txt * txt]` with its category's
        weights: image dimension + text dimension long (without an image, a zero image part)."""
        texts = {"title": title, "description": description, "category": category,
                 "currency": currency}  # fmt: skip
        for name, value in texts.items():
            if not isinstance(value, str) and (value is not None or name == "title"):
                raise ConfigurationError(f"{name} must be text, not {type(value).__name__}")
        try:  # as an import reads it: "€ 29,99" is 29.99, "abc" or -3 is refused
            price = parse_price(price)
        except ProductRowError as exc:
            raise ConfigurationError(str(exc)) from None
        text = product_text(title, description, category, price, currency)
        text_vector = self.generate_text_embedding(text)
        image_vector = self.generate_image_embedding(image_url) if image_url else None
        return self.combine_embeddings(text_vector, image_vector, category)

    def combine_embeddings(
        self,
        text_emb: Sequence[float],
        image_emb: Sequence[float] | None = None,
        category: str | None = None,
    ) -> list[float]:
        """`[w_img * img ; w_txt * txt]` of the two unit vectors, with the weights of the
        category (or its alias); without an image, a zero image part."""
        log.debug("[COMBINED] Combining text and image embeddings")
        key, weights = self.weights.weights(category)
        try:
            combined = fusion.fuse(
                image_emb, text_emb, weights, self.service.dimension, self.text_embedder.dimension()
            )
        except fusion.WidthError as exc:  # e.g. OpenAI's 1536-d text vectors, MiniLM's 384
            models = {"image": f"{self.service.model_ref} (IMGEMBED_MODEL)",
                      "text": f"{self.text_embedder.name} (IMGEMBED_TEXT_MODEL)"}  # fmt: skip
            raise ConfigurationError(
                f"{exc}: the width of this catalogue's {exc.part} model, {models[exc.part]}; "
                "give vectors of these models, or set the one that made them"
            ) from None
        log.debug(
            "[COMBINED] Successfully generated combined embedding (length: %d, %s "
            "weights %.2f/%.2f)",
            combined.shape[0],
            key,
            weights.image,
            weights.text,
        )
        return combined.tolist()

    # -- products -------------------------------------------------------------------------

    def import_file(
        self, path: str | Path, store_id: str, format: str | None = None
    ) -> ImportReport:
        """Upsert a CSV / JSONL / Shopify products.json file's products into the store; bad
        rows are reported with their line and skipped."""
        started = time.perf_counter()
        store_id = checked_store_id(store_id)
        parsed = importer.read_catalogue(Path(path), format)
        report = ImportReport(
            store_id,
            str(path),
            parsed.format,
            rows=parsed.rows,
            bad_rows=list(parsed.bad_rows),
            encoding=parsed.encoding,
        )
        self._upsert(report, parsed.products)
        report.duration = time.perf_counter() - started
        return report

    def upsert_products(
        self, store_id: str, products: Iterable[Mapping[str, Any] | ProductInput]
    ) -> ImportReport:
        """Upsert products given as mappings (the import's column names, or Shopify product
        objects) or ProductInputs; a bad one, also one that is neither, is reported by its
        position (1-based)."""
        started = time.perf_counter()
        report = ImportReport(checked_store_id(store_id), "request", "objects")
        numbered: list[tuple[int, ProductInput]] = []
        for number, item in enumerate(products, 1):
            report.rows += 1
            try:
                product = item if isinstance(item, ProductInput) else importer.product(item)
                numbered.append((number, product))
            except ProductRowError as exc:
                report.bad_rows.append(importer.BadRow(number, str(exc)))
        good = self._upsert(report, importer.first_of_each(numbered, report.bad_rows))
        report.product_ids = [product.product_id for product in good]
        report.duration = time.perf_counter() - started
        return report

    def _upsert(
        self, report: ImportReport, numbered: list[tuple[int, ProductInput]]
    ) -> list[ProductInput]:
        """Store the products (line or position, product); a row without a title updates
        a stored product, and is a bad row for one that is not there yet. The stored ones."""
        untitled = [p.product_id for _, p in numbered if "title" not in p.given]
        new = set(self.repository.unknown(report.store_id, untitled)) if untitled else set()
        kept: list[tuple[int, ProductInput]] = []
        for line, product in numbered:
            if product.product_id in new and "title" not in product.given:
                message = (
                    f"product {product.product_id}: no title (a new product needs one: give a "
                    "title or name)"
                )
                report.bad_rows.append(importer.BadRow(line, message))
            else:
                kept.append((line, product))
        stored = []
        for start in range(0, len(kept), _IMPORT_CHUNK):
            stored += self._store_chunk(report, kept[start : start + _IMPORT_CHUNK])
        report.bad_rows.sort(key=lambda row: row.line)
        return stored

    def _store_chunk(
        self, report: ImportReport, chunk: list[tuple[int, ProductInput]]
    ) -> list[ProductInput]:
        """One transaction; if the database refuses a value in it, each product alone, so
        that the one it refuses is a bad row and the others are stored."""
        stored: list[ProductInput] = []

        def write(rows: list[tuple[int, ProductInput]]) -> None:
            products = [product for _, product in rows]
            counts = self.repository.upsert_products(report.store_id, products)
            report.inserted += counts[0]
            report.updated += counts[1]
            report.unchanged += counts[2]
            stored.extend(products)

        def refused(row: tuple[int, ProductInput], exc: InvalidRecordError) -> None:
            report.bad_rows.append(importer.BadRow(row[0], str(exc)))

        each_on_refusal(write, chunk, refused)
        return stored

    def product(self, store_id: str, product_id: str) -> dict[str, Any] | None:
        """One product with its embedding status and provenance (no vectors), or None. The
        price is a float as in search hits (a Decimal would reach JSON as a string)."""
        found = self.repository.product(_store(store_id), product_id)
        if found is not None and found["price"] is not None:
            found["price"] = float(found["price"])
        return found

    # -- embedding ---------------------------------------------------------------------------

    def embed(
        self,
        store_id: str,
        *,
        batch_size: int = 50,
        mode: str = "changed",
        product_ids: Sequence[str] | None = None,
        events: jobs.EmbedEvents | None = None,
        runner: jobs.Runner | None = None,
    ) -> jobs.EmbedStats:
        """Embed the store's products that need it (see imgembed.catalog.jobs): `changed`
        (default), `missing` (no vectors yet or failed) or `force` (all; with other models
        than the store's, its vectors are first forgotten, in one transaction). `runner`
        runs the planned job elsewhere (imgembed.distributed: on Ray); by default, here."""
        if mode not in jobs.MODES:
            raise ConfigurationError(f"mode must be one of {', '.join(jobs.MODES)}, not {mode!r}")
        if batch_size < 1:
            raise ConfigurationError("batch_size must be at least 1")
        store_id = self._embed_target(store_id, product_ids)
        current = self.provenance()
        # The job's own session: its store lock is held by this connection alone.
        repository = self.repository.session()
        try:
            with repository.store_lock(store_id):
                recorded = repository.provenance(store_id)
                if recorded is None or recorded[0] != current:
                    if _binds(repository, store_id, recorded) and mode != "force":
                        raise _mismatch(store_id, recorded[0], current)
                    repository.set_provenance(
                        store_id, current, self.weights.version, reset=recorded is not None
                    )
                run = jobs.EmbedRun(
                    repository, self.service, self.text_embedder, self.weights, current, store_id
                )
                return (runner or jobs.EmbedRun.run)(run, mode, batch_size, product_ids, events)
        finally:
            repository.close()

    def embed_total(
        self,
        store_id: str,
        product_ids: Sequence[str] | None = None,
        mode: str = "changed",
        *,
        check_busy: bool = True,
    ) -> int:
        """How many products an embed run would process now (0: all are up to date), with
        the refusals it would meet first: a store without products (CollectionNotFoundError),
        an id without a product (ProductNotFoundError), a store embedded with other models
        (ProvenanceMismatchError, unless `force`), a store another job embeds now
        (StoreBusyError; `check_busy=False` when the run will queue behind that job). For a
        job that starts later (HTTP)."""
        store_id = self._embed_target(store_id, product_ids)
        if check_busy:
            self.repository.check_not_busy(store_id)
        recorded = self.repository.provenance(store_id)
        bound = mode != "force" and _binds(self.repository, store_id, recorded)
        if bound and recorded and recorded[0] != (now := self.provenance()):  # loads models
            raise _mismatch(store_id, recorded[0], now)
        rows = self.repository.plan_rows(store_id, product_ids)
        return len(jobs.plan(rows, self.weights, mode))

    def _embed_target(self, store_id: str, product_ids: Sequence[str] | None) -> str:
        """The store's id, checked: a mistyped store or id must not pass as a finished job."""
        store_id = _store(store_id)
        if product_ids is not None:
            ids = list(dict.fromkeys(product_ids))
            unknown = self.repository.unknown(store_id, ids)
            if unknown:
                named = ", ".join(repr(i) for i in unknown[:5]) + (" ..." if unknown[5:] else "")
                raise ProductNotFoundError(f"no product {named} in store {store_id!r}")
        elif not self.repository.count(store_id):
            raise CollectionNotFoundError(_no_products(store_id))
        return store_id

    # -- search and statistics ---------------------------------------------------------------

    def search(
        self,
        store_id: str,
        text: str | None = None,
        *,
        image: Input | None = None,
        top_k: int = 10,
        category: str | None = None,
        max_price: float | Decimal | None = None,
    ) -> list[search.ProductHit]:
        """Products for a text, an image, or both, best first, with the score of each part."""
        top_k = similarity.checked_top_k(top_k)
        store_id = _read_store(store_id)  # " ws " is the store "ws" here too, as in import
        for name, value in {"text": text, "category": category}.items():
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(f"{name} must be text, not {type(value).__name__}")
        category = (category or "").strip() or None  # an empty form field: no filter
        price_limit = _max_price(max_price)
        if isinstance(text, str) and has_surrogates(text):  # text models' tokenizers fail
            raise ConfigurationError(
                "the search text is not valid UTF-8: it holds a lone surrogate (a JSON escape "
                "such as \\ud800 without its pair)"
            )
        recorded = self.repository.provenance(store_id)
        if recorded is None:
            raise CollectionNotFoundError(_nothing_to_search(self.repository, store_id))
        text = text if text and text.strip() else None  # blank: a search by the photo
        # a photo alone needs no text model: its API may be down, or want a key
        embedder = self.text_embedder if text is not None else None
        query = search.build_query(self.service, embedder, text, image)
        current = self.provenance() if text is not None else self._image_provenance(recorded[0])
        if recorded[0] != current:
            raise _mismatch(store_id, recorded[0], current)
        rows = self.repository.search(
            store_id,
            part=query.part,
            dimension=query.dimension(current),
            query=query.vector,
            image_query=query.image,
            text_query=query.text,
            top_k=top_k,
            ef_search=self.settings.hnsw_ef_search,
            # a name the table does not know matches products of that name only, not the
            # default category every unknown name falls into
            category_key=self.weights.category_of(category),
            category=category,
            max_price=price_limit,
        )
        if not rows:  # no match, or nothing the query's part could rank at all
            _check_rankable(self.repository, store_id, query.part)
        return search.hits(rows, query)

    def stats(self, store_id: str) -> StoreStats:
        """Counts of the store's products by state and category, without loading a model."""
        repository = self.repository
        store_id = _read_store(store_id)
        counts = repository.stats(store_id)
        if not counts["total"]:
            raise CollectionNotFoundError(f"store {store_id!r} has no products")
        recorded = repository.provenance(store_id)
        to_embed = jobs.plan(repository.plan_rows(store_id), self.weights, "changed")
        last = counts.pop("last_embedded_at")
        return StoreStats(
            store_id=store_id,
            **counts,
            to_embed=len(to_embed),
            last_embedded_at=last.isoformat() if last else None,
            provenance=asdict(recorded[0]) if recorded else None,
            weights_version=recorded[1] if recorded else None,
            current_weights_version=self.weights.version,
            indexes_missing=repository.missing_indexes(store_id, recorded[0]) if recorded else [],
        )

    def close(self) -> None:
        if self._text_embedder is not None:
            self._text_embedder.close()
        if self._repository is not None:
            self._repository.close()
        if self._owns_service:
            self.service.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def store_settings(settings: Settings, recorded: StoreProvenance | None) -> Settings:
    """The settings with the store's own models wherever `settings` name none explicitly."""
    if recorded is None:
        return settings
    explicit = settings.model_fields_set
    defaults: dict[str, Any] = {}
    if not explicit & {"model", "pretrained"}:
        defaults.update(model=recorded.image_model, pretrained=recorded.image_pretrained)
    if "text_model" not in explicit:
        defaults["text_model"] = spec_for(recorded.text_model)
    return load_settings(settings, **defaults) if defaults else settings


def _binds(
    repository: ProductRepository, store_id: str, recorded: tuple[StoreProvenance, str] | None
) -> bool:
    """Whether the store's recorded models bind a run to them: not while no run has stored
    a vector with them (its text API was down, say); then any models are taken, no --force."""
    return recorded is not None and repository.has_vectors(store_id)


def _store(store_id: str) -> str:
    if not isinstance(store_id, str) or not store_id.strip():
        raise ConfigurationError("a store id is required: a name, not empty or blank")
    return store_id.strip()


def _read_store(store_id: str) -> str:
    """A store id to read: one with a NUL character was never stored (the database cannot
    hold it), so it has no products, as any unknown store."""
    store_id = _store(store_id)
    if never_stored(store_id):
        raise CollectionNotFoundError(f"store {printable(store_id)!r} has no products")
    return store_id


def _no_products(store_id: str) -> str:
    return (
        f"store {store_id!r} has no products: import some first "
        f"(imgembed catalog import FILE --store-id {shlex.quote(store_id)})"
    )


def _nothing_to_search(repository: ProductRepository, store_id: str) -> str:
    if not repository.count(store_id):
        return _no_products(store_id) + ", then embed them"
    quoted = shlex.quote(store_id)
    return f"store {store_id!r} has no embeddings: run imgembed catalog embed --store-id {quoted}"


def _max_price(value: Any) -> Decimal | None:
    """A search's price limit, read as an import reads a price ("€ 50" is 50); infinity is
    no limit. NaN passed every product (PostgreSQL's NaN is above any price), a negative
    limit none, and text that is no number was decimal's own exception."""
    if isinstance(value, float | Decimal) and value == float("inf"):
        return None
    try:
        return parse_price(value)
    except ProductRowError as exc:
        raise ConfigurationError(f"max_price: {exc}") from None


def _check_rankable(repository: ProductRepository, store_id: str, part: str) -> None:
    """An empty answer is "no product matches" only if some product holds the part that
    ranks the query; else the store cannot answer it (every product failed, a forced run
    with new models stopped before its first batch, a photo among text-only products)."""
    counts = repository.embedded_parts(store_id)
    if counts[part]:
        return
    quoted = shlex.quote(store_id)
    if part == "image" and counts["combined"]:
        raise CollectionNotFoundError(
            f"no product of store {store_id!r} has an image embedding (its "
            f"{counts['combined']} embedded products have none): search it by a text"
        )
    raise CollectionNotFoundError(
        f"store {store_id!r} has no embedded products yet (none has vectors of its models; "
        f"imgembed catalog stats --store-id {quoted} counts the failed ones by error): run "
        f"imgembed catalog embed --store-id {quoted}"
    )


def checked_store_id(store_id: str) -> str:
    """A new store's id, one that can be named everywhere: as a path segment in the HTTP
    routes too (ConfigurationError if not)."""
    store_id = _store(store_id)
    if len(store_id) > MAX_ID_LENGTH:  # as a product id: a key of the products' index
        raise ConfigurationError(
            f"store id {store_id[:40]!r}... is longer than {MAX_ID_LENGTH} characters"
        )
    if "/" in store_id or store_id in (".", "..") or has_control(store_id):
        raise ConfigurationError(
            f"store id {store_id!r} is '.', '..' or holds a '/' or a control character: the "
            "HTTP routes could not name it (/api/v1/stores/<store id>/...); choose another"
        )
    return store_id


def _mismatch(
    store_id: str, recorded: StoreProvenance, current: StoreProvenance
) -> ProvenanceMismatchError:
    return ProvenanceMismatchError(
        f"store {store_id!r} was embedded with {recorded.describe()}; this catalogue uses "
        f"{current.describe()}. Use the store's models (IMGEMBED_MODEL={recorded.image_model} "
        f"IMGEMBED_PRETRAINED={recorded.image_pretrained} "
        f"IMGEMBED_TEXT_MODEL={spec_for(recorded.text_model)}), or re-embed every product with "
        f"the new ones: IMGEMBED_MODEL={current.image_model} "
        f"IMGEMBED_PRETRAINED={current.image_pretrained} "
        f"IMGEMBED_TEXT_MODEL={spec_for(current.text_model)} "
        f"imgembed catalog embed --store-id {shlex.quote(store_id)} --force"
    )
