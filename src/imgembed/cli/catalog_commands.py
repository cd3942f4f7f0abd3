"""`imgembed catalog ...`: the product catalogue of the Findly document (import, embed, search,
stats). Output of `embed` follows the document (its emoji lines, [BATCH] lines, progress and
final statistics) on stderr; --json prints machine-readable results on stdout instead."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from imgembed.cli.common import (
    DeviceOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    RayOpt,
    RuntimeOpt,
    app,
    err,
    fail,
    make_settings,
    tables,
    waiting_line,
)
from imgembed.errors import ImgEmbedError, StoreBusyError, StoreFullError, StoreUnavailableError

catalog_app = typer.Typer(
    help="Products per store: text + image embeddings fused by category, and product search.",
    no_args_is_help=True,
)
app.add_typer(catalog_app, name="catalog")

StoreOpt = Annotated[
    str, typer.Option("--store-id", "--store_id", help="The store the products belong to.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON on stdout instead of text.")]
TextModelOpt = Annotated[
    str | None,
    typer.Option(
        "--text-model", help="minilm | clip | openai:<model> | ollama:<model> | a model folder."
    ),
]


def _say(text: str) -> None:
    err.print(text, highlight=False)


def _catalog(store_id: str | None = None, **options: Any):
    """A Catalog with the store's own models for whatever the options do not name."""
    from imgembed.catalog import Catalog

    given = {key: value for key, value in options.items() if value is not None}
    if store_id is None:
        return Catalog(**given)
    return Catalog.for_store(store_id, **given)


@catalog_app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="products.csv | .jsonl | Shopify products.json")],
    store_id: StoreOpt,
    format_: Annotated[
        str | None,
        typer.Option("--format", help="csv | jsonl | shopify (default: by the file's suffix)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add or update products (by product id); bad rows are reported with their line and
    skipped (exit 1 if there were any)."""
    try:
        with _catalog() as catalog:
            report = catalog.import_file(file, store_id, format_)
    except (StoreUnavailableError, StoreFullError, StoreBusyError) as exc:
        # products are stored in transactions of 1,000: those written stay
        _say(
            "The products written before this are kept: import the same file again to go on "
            "(they come out unchanged)."
        )
        raise fail(exc) from exc
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        if report.encoding == "windows-1252":  # said: a guess, if a good one
            _say(f"   {file} is not UTF-8: read as Windows-1252 (Excel's CSV in Western Europe)")
        _say(
            f"📦 Imported {report.rows} rows from {file} into store {report.store_id}: "
            f"{report.inserted} new, {report.updated} updated, {report.unchanged} unchanged, "
            f"{len(report.bad_rows)} bad ({report.duration:.2f} s)"
        )
        for bad in report.bad_rows:
            _say(f"  ⚠️  {file}:{bad.line}: {bad.message}")
    if report.bad_rows:
        raise typer.Exit(1)


class _Lines:
    """The Findly document's progress lines (none with --json), and what was written."""

    def __init__(self, verbose: bool, quiet: bool = False):
        self.verbose = verbose
        self.quiet = quiet
        self.written = 0  # batches stored
        self.processed = self.to_process = 0
        self.created = time.perf_counter()
        self.loading = 0.0  # seconds before the run began: the models, the database
        self.shown_wait = ""

    def say(self, text: str) -> None:
        if not self.quiet:
            _say(text)

    def started(self, stats: Any) -> None:
        self.loading = time.perf_counter() - self.created
        self.to_process = stats.to_process
        # the Findly document's words, as its users grep for them
        self.say(f"🚀 Starting image embedding generation for store: {stats.store_id}")
        self.say(f"📊 Total products to process: {stats.to_process}")
        if stats.skipped:
            self.say(f"   ({stats.skipped} of {stats.total} products are up to date)")

    def batch(self, number: int, stats: Any, size: int) -> None:
        products = f"{size} product{'s' * (size != 1)}"
        self.say(f"\n[BATCH] Processing batch {number}/{stats.batches} ({products})")
        self.say(f"📈 Progress: {stats.processed}/{stats.to_process} products processed")

    def product(self, product_id: str, error: str | None, text_only: bool = False) -> None:
        if not self.verbose:
            return
        if error is None:  # the Findly document's words, where an image was embedded
            kind = "text embedding" if text_only else "image embedding"
            extra = " (no image)" if text_only else ""
            self.say(f"✅ Successfully generated {kind} for product {product_id}{extra}")
        else:
            self.say(f"❌ Failed to generate embeddings for product {product_id}: {error}")

    def batch_done(self, stats: Any) -> None:
        self.written += 1
        self.processed = stats.processed
        self.say(f"📊 Progress: {100 * stats.processed / stats.to_process:.1f}% complete")

    def waiting(self, what: str) -> None:  # once each: it is called every half second
        if what != self.shown_wait:
            self.shown_wait = what
            self.say(waiting_line(what))


def _resume(force: bool) -> str:
    """How to go on after a stopped run. A --force run has moved the store to this run's
    models and marked what it had yet to redo: without --force the rerun does what is left;
    with it, everything again."""
    if force:
        return "run it again without --force to go on (what this run stored is skipped)"
    return "run the same command again to go on (what is stored is skipped)"


def _debug_log() -> None:
    """--verbose: the library's [TEXT] / [IMAGE] / [COMBINED] debug lines on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("imgembed.catalog")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False


@catalog_app.command("embed")
def embed(
    store_id: StoreOpt,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "--batch_size", min=1, help="Products per batch.")
    ] = 50,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="A line per product and the debug log."),
    ] = False,
    only_missing: Annotated[
        bool,
        typer.Option("--only-missing", help="Only products without embeddings or that failed."),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Every product (also with other models).")
    ] = False,
    as_json: JsonOpt = False,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    text_model: TextModelOpt = None,
    device: DeviceOpt = None,
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
    ray: RayOpt = None,
) -> None:
    """Embed the store's products that are new, changed or failed before, in atomic batches
    (a killed run resumes where it stopped); exit 1 if any product failed."""
    if only_missing and force:
        _say("error: --only-missing and --force exclude each other")
        raise typer.Exit(2)
    if verbose:
        _debug_log()
    mode = "force" if force else "missing" if only_missing else "changed"
    events = _Lines(verbose, quiet=as_json)
    try:
        if ray is not None:
            from imgembed import distributed  # ray: only for --ray

            distributed.check_address(ray)
        with _catalog(
            store_id,
            model=model,
            pretrained=pretrained,
            text_model=text_model,
            device=device,
            runtime=runtime,
            precision=precision,
        ) as catalog:
            options = {"batch_size": batch_size, "mode": mode, "events": events}
            if ray is None:
                stats = catalog.embed(store_id, **options)
            else:
                stats = distributed.embed_store(catalog, store_id, address=ray, **options)
    except ImgEmbedError as exc:
        if events.written:  # a dependency broke mid-run
            written = (
                "batch already written is" if events.written == 1 else "batches already written are"
            )
            _say(f"The {events.written} {written} kept: {_resume(force)}.")
        raise fail(exc) from exc
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: between batches, or inside one
        _say(
            f"Interrupted after {events.processed} of {events.to_process} products: the "
            f"{events.written} batches written are kept; {_resume(force)}."
        )
        raise typer.Exit(130) from None
    if as_json:
        typer.echo(json.dumps(stats.to_dict(), indent=2, ensure_ascii=False))
    else:
        _say("\n🎉 Image embedding generation completed!")
        _say(
            "📊 Final Statistics:\n"
            f"   Total products: {stats.total}\n   Processed: {stats.processed}\n"
            f"   Successful: {stats.successful}\n   Failed: {stats.failed}\n"
            f"   Skipped: {stats.skipped}\n   Duration: {stats.duration:.2f} seconds\n"
            f"   Loading before it (models, database): {events.loading:.2f} seconds\n"
            f"   Without image (text only): {stats.text_only}\n"
            f"   Products/s: {stats.products_per_second:.1f}"
        )
        for failure in stats.failures:
            _say(f"  ❌ {failure['product_id']}: {failure['error']} ({failure['error_type']})")
    if stats.failed:
        raise typer.Exit(1)


@catalog_app.command("search")
def search(
    store_id: StoreOpt,
    text: Annotated[str | None, typer.Argument(help="What to look for, e.g. 'rode jurk'.")] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="A query image (path or URL), alone or with text.")
    ] = None,
    category: Annotated[
        str | None, typer.Option("--category", help="Only this category (or its alias).")
    ] = None,
    max_price: Annotated[
        float | None, typer.Option("--max-price", "--max_price", min=0, help="Price at most.")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "--top_k", "-k", min=1, help="How many.")] = 10,
    as_json: JsonOpt = False,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    text_model: TextModelOpt = None,
    device: DeviceOpt = None,
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Products for a text, an image or both, with the score of each part. The store's own
    models are used unless others are named."""
    if text is None and image is None:
        _say("error: give a text, --image, or both")
        raise typer.Exit(2)
    from imgembed import resident

    try:
        settings = make_settings(
            model=model,
            pretrained=pretrained,
            text_model=text_model,
            device=device,
            runtime=runtime,
            precision=precision,
        )
        query = resident.ProductQuery(store_id, text, image, top_k, category, max_price)
        rows = resident.search_products(settings, query)  # after `db start`: its process
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not rows:  # an empty table said nothing
        limits = [f"category {category!r}" if category else "", f"price <= {max_price:g}"
                  if max_price is not None else ""]  # fmt: skip
        within = " and ".join(part for part in limits if part)
        _say(f"no product matches{' with ' + within if within else ''}")
        return
    # numbers stay whole in a narrow terminal (they are what one checks by hand); words wrap
    numbers = {"no_wrap": True, "justify": "right"}
    table = Table(
        Column("#", **numbers),
        Column("score", min_width=6, **numbers),
        Column("image", min_width=8, **numbers),
        Column("text", min_width=6, **numbers),
        Column("w img/txt", min_width=9, **numbers),
        Column("product", overflow="fold"),
        Column("title", overflow="fold"),
        Column("category", overflow="fold"),
        Column("price", overflow="fold"),
        title=f"ranked by the {rows[0]['ranked_by']} score" if rows else None,
    )
    for hit in rows:
        weights = f"{hit['image_weight']:.2f}/{hit['text_weight']:.2f}"
        price = hit["price"]
        table.add_row(
            str(hit["rank"]),
            f"{hit['score']:.4f}",
            _cell(hit["image_score"], "no image" if hit["text_only"] else "—"),
            _cell(hit["text_score"], "—"),
            weights if hit["ranked_by"] == "combined" else "—",
            hit["product_id"],
            hit["title"],
            f"{hit['category'] or ''} ({hit['weight_category']})",
            "" if price is None else f"{price:.2f} {hit['currency'] or ''}".strip(),
        )
    tables().print(table)


def _cell(value: float | None, missing: str) -> str:
    return missing if value is None else f"{value:.4f}"


@catalog_app.command("stats")
def stats(store_id: StoreOpt, as_json: JsonOpt = False) -> None:
    """The store's products by state and category, its models and weights table."""
    try:
        with _catalog() as catalog:
            result = catalog.stats(store_id)
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return
    table = Table("store " + result.store_id, "", show_header=True)
    rows = [
        ("products", result.total),
        ("embedded", result.embedded),
        ("  of which without image", result.text_only),
        ("failed", result.failed),
        ("pending (new, or left by a stopped --force run)", result.pending),
        ("to embed now (new, changed, failed)", result.to_embed),
        ("without image URL", result.without_image_url),
        ("last embedded", result.last_embedded_at or "never"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    for name, count in result.categories.items():
        table.add_row(f"category {name}", str(count))
    for name, count in result.errors.items():
        table.add_row(f"error {name}", str(count))
    if result.provenance:
        p = result.provenance
        table.add_row(
            "image model", f"{p['image_model']} ({p['image_pretrained']}), {p['image_dimension']}-d"
        )
        table.add_row("text model", f"{p['text_model']}, {p['text_dimension']}-d")
    stale = result.weights_version not in (None, result.current_weights_version)
    table.add_row(
        "weights table",
        f"{result.current_weights_version}"
        + (f" (store embedded with {result.weights_version})" if stale else ""),
    )
    if result.indexes_missing:
        table.add_row(
            "search indexes missing",
            f"{', '.join(result.indexes_missing)}: searched exactly until the next "
            "`imgembed catalog embed` builds them",
        )
    tables().print(table)
