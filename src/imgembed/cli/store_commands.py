"""Commands over a vector store: index, search, duplicates, collections, db."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.table import Table

from imgembed.cli.common import (
    BatchOpt,
    CollectionOpt,
    DeviceOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    RayOpt,
    RuntimeOpt,
    app,
    err,
    fail,
    make_service,
    make_settings,
    progress_bar,
    tables,
    waiting_line,
)
from imgembed.cli.output import check_writable
from imgembed.errors import ImgEmbedError, OutputError
from imgembed.names import printable

if TYPE_CHECKING:
    from imgembed.engine.pipeline import Progress

JsonOpt = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]
collections_app = typer.Typer(help="Collections in the store.", invoke_without_command=True)
db_app = typer.Typer(help="The database: migrations and the embedded server.", no_args_is_help=True)
app.add_typer(collections_app, name="collections")
app.add_typer(db_app, name="db")


@app.command()
def index(
    sources: Annotated[
        list[str],
        typer.Argument(help="Folders, image files, URLs, or lists: .txt, .csv, .jsonl."),
    ],
    collection: CollectionOpt = None,
    prune: Annotated[
        bool, typer.Option("--prune", help="Remove stored items not among these sources.")
    ] = False,
    failures: Annotated[
        Path | None, typer.Option("--failures", help="Write each failure as a JSON line.")
    ] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
    batch_size: BatchOpt = None,
    ray: RayOpt = None,
) -> None:
    """Embed and store images; re-runs add only what is new or changed (exit 1 on failures).
    An existing collection keeps its own model unless --model is given. A store failure
    (exit 6) keeps what was stored: run the same command again to go on."""
    from imgembed.indexing import read_index_sources
    from imgembed.store.base import checked_name

    done, items, store, name = 0, [], None, ""
    try:
        if ray is not None:
            from imgembed import distributed  # ray: only for --ray

            distributed.check_address(ray)
        if failures:
            check_writable(failures, "failures file")  # now, not after the work
        service = make_service(
            model=model,
            pretrained=pretrained,
            device=device,
            runtime=runtime,
            precision=precision,
            batch_size=batch_size,
        )
        name = checked_name(collection or service.settings.collection)  # before any work
        items = read_index_sources(sources, service.settings.supported_formats)
        with err.status(f"loading the {service.settings.store} store and the model"):
            if model is None:  # an existing collection goes on with its own model
                service = service.for_indexing(name)
            service.encoder  # noqa: B018 - fail on the model before showing progress
            store = service.store
        where = "" if ray is None else f", on Ray ({ray})"
        err.print(
            f"Indexing {len(items)} images into collection '{name}' "
            f"({service.model_ref}, {store.backend}{where})",
            highlight=False,
        )
        with progress_bar() as bar:
            task = bar.add_task("indexing", total=len(items))
            shown = ""  # what the run waits for, said once: it is reported every half second

            def update(progress: Progress) -> None:
                nonlocal done, shown
                done = progress.done
                bar.update(task, completed=progress.done)
                if progress.waiting and progress.waiting != shown:
                    shown = progress.waiting
                    bar.print(waiting_line(shown), highlight=False)

            if ray is None:
                stats = service.index(items, name, prune=prune, progress=update)
            else:
                stats = distributed.index(
                    service, items, name, prune=prune, progress=update, address=ray
                )
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM
        err.print(
            f"Interrupted after {done} of {len(items)} images{_holds(store, name)}: the batches "
            "stored are kept; run the same command again to go on (what is stored is skipped).",
            highlight=False,
        )
        raise typer.Exit(130) from None
    unpruned = " (not pruned: some sources could not be read)" if stats.prune_skipped else ""
    err.print(
        "Indexing completed. Final statistics:\n"
        f"   Total: {stats.total}\n   Processed: {stats.processed}\n"
        f"   Successful: {stats.successful}\n   Failed: {stats.failed}\n"
        f"   Skipped: {stats.skipped} (unchanged)\n   Pruned: {stats.pruned}{unpruned}\n"
        f"   Duration: {stats.duration:.2f} seconds\n   Images/s: {stats.images_per_second:.1f}",
        highlight=False,
    )
    for failure in stats.failures:
        err.print(f"  failed: {failure['error']} ({failure['error_type']})")
    if failures:
        lines = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in stats.failures)
        try:
            failures.write_text(lines, "utf-8")
        except OSError as exc:
            where = printable(str(failures))
            raise fail(OutputError(f"cannot write {where}: {exc.strerror or exc}")) from exc
    if stats.failed:
        raise typer.Exit(1)


def _filters(pairs: list[str]) -> dict[str, Any]:
    """`key=value` matches a text value; `key:=value` a JSON one (2020, true, ["a"]), as
    metadata from JSONL lists or the HTTP API holds numbers and booleans. A malformed one is
    a usage error (exit 2)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        typed = key.endswith(":")
        key = key.removesuffix(":")
        if not sep or not key:
            _usage(f"--filter takes key=value or key:=JSON, not {pair!r}")
        try:
            out[key] = json.loads(value) if typed else value
        except json.JSONDecodeError as exc:
            _usage(f"--filter {pair!r}: not JSON after ':=' ({exc})")
    return out


def _usage(message: str) -> NoReturn:
    err.print(f"error: {message}", highlight=False)
    raise typer.Exit(2)


def _holds(store: Any, name: str) -> str:
    """What the collection holds now: on Ray, writers store batches the driver has not yet
    heard of when it stops, so its own count falls short."""
    if store is None:  # stopped before the store was open
        return ""
    try:
        return f" ({name!r} now holds {store.count(name)} items)"
    except (ImgEmbedError, KeyboardInterrupt):  # a store that is down, a second Ctrl-C
        return ""


@app.command()
def search(
    text: Annotated[str | None, typer.Argument(help="Text to search images by.")] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="Search by an image (path or URL).")
    ] = None,
    collection: CollectionOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many hits.")] = 10,
    filter_: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            help="Metadata key=value (text), or key:=JSON for numbers, booleans, lists "
            "(year:=2020, in_stock:=true); repeatable.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Images most similar to a text or an image; the collection's model is used by default."""
    if (text is None) == (image is None):
        err.print("error: give a text or --image (one of them)")
        raise typer.Exit(2)
    from imgembed import resident

    try:
        query = resident.SearchQuery(
            text, image, collection, top_k, _filters(filter_ or []), own_model=model is None
        )
        settings = make_settings(
            model=model, pretrained=pretrained, device=device, runtime=runtime, precision=precision
        )
        hits = resident.search(settings, query)  # after `imgembed db start`: its process
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    rows = [
        {
            "rank": hit.rank,
            "id": hit.metadata["id"],
            "source": hit.image_path,
            "score": round(hit.similarity_score, 6),
            "metadata": {k: v for k, v in hit.metadata.items() if k != "id"},
        }
        for hit in hits
    ]
    if as_json:
        typer.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    if not rows:  # an empty table said nothing
        err.print(f"no item matches{' these filters' if filter_ else ''}", highlight=False)
        return
    show_id = any(row["id"] != row["source"] for row in rows)  # catalogues: ids like SKUs
    table = Table("#", "score", *(["id"] if show_id else []), "source", "metadata")
    table.columns[-2].overflow = "fold"
    for row in rows:
        extra = {k: v for k, v in row["metadata"].items() if k not in _IMAGE_KEYS}
        cells = [str(row["rank"]), f"{row['score']:.4f}", *([row["id"]] if show_id else [])]
        table.add_row(*cells, row["source"], json.dumps(extra, ensure_ascii=False))
    tables().print(table)


_IMAGE_KEYS = ("width", "height", "format", "confidence")


@app.command()
def duplicates(
    collection: CollectionOpt = None,
    threshold: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="Cosine that counts as a duplicate (default per model)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Groups of near-duplicate images in a collection."""
    try:
        found = make_service().duplicates(collection, threshold)
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    groups = found.groups
    if as_json:
        typer.echo(json.dumps([[{"id": i, "source": s} for i, s in g] for g in groups], indent=2))
        return
    for number, group in enumerate(groups, 1):
        typer.echo(f"group {number} ({len(group)} images):")
        for item_id, source in group:
            typer.echo(f"  {item_id}" + (f"  {source}" if source != item_id else ""))
    err.print(
        f"{len(groups)} groups of near-duplicates (cosine >= {found.threshold})", highlight=False
    )


@collections_app.callback()
def collections(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Each collection with its backend, model, dimension and count."""
    if ctx.invoked_subcommand:
        return
    try:
        infos = make_service().store.collections()
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    rows = [
        {"name": i.name, "backend": i.backend, "model": i.provenance.model,
         "pretrained": i.provenance.pretrained, "dimension": i.provenance.dimension,
         "count": i.count}
        for i in infos
    ]  # fmt: skip
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "backend", "model", "pretrained", "dim", "count")
    for row in rows:
        table.add_row(*(str(row[k]) for k in ("name", "backend", "model", "pretrained",
                                              "dimension", "count")))  # fmt: skip
    tables().print(table)


@collections_app.command("drop")
def collections_drop(name: str) -> None:
    """Delete a collection and everything in it."""
    try:
        make_service().store.drop_collection(name)
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    err.print(f"dropped collection '{name}'", highlight=False)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the schema migrations (also done automatically on first use)."""
    from imgembed.store import postgres_target
    from imgembed.store.postgres import migrate, revisions

    try:
        url = postgres_target(make_settings()).url
        migrate(url)
        current, head = revisions(url)
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    err.print(f"schema at revision {current} (newest: {head})", highlight=False)


@db_app.command("start")
def db_start(
    keep: Annotated[
        str,
        typer.Option(
            "--for",
            help="How long to keep it up, used or not: 90s, 30m, 2h (default 1h).",
        ),
    ] = "1h",
) -> None:
    """Start the embedded server and keep it up between commands (each would otherwise start
    and stop it); `imgembed db stop` ends it sooner."""
    from imgembed.store import keep_embedded

    seconds = _duration(keep)
    try:
        until = keep_embedded(make_settings(), seconds, runner="imgembed.resident")
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    typer.echo(f"running; kept up until {_clock(until)}, searches answered by its process")


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        seconds = -1
    if not seconds > 0 or seconds == float("inf"):  # nan, inf: not durations
        err.print(f"error: --for {text!r}: give a duration such as 90s, 30m or 2h")
        raise typer.Exit(2)
    return seconds


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


@db_app.command("status")
def db_status() -> None:
    """The embedded server's state, or the external database's schema revision."""
    from imgembed import resident
    from imgembed.store import embedded

    try:
        settings = make_settings()
        if settings.database_url:
            from imgembed.store.postgres import revisions

            current, head = revisions(settings.database_url)
            typer.echo(f"external database: schema {current or 'none'} (newest {head})")
            return
        state = embedded.status(settings.data_dir)
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    running = f"running (pid {state.pid}, socket {state.socket})" if state.running else "stopped"
    if state.kept_until:
        running += f", kept up until {_clock(state.kept_until)} (imgembed db start)"
        if pid := resident.status(settings.data_dir):
            running += f", searches answered by pid {pid}"
    if state.keeper_lost:
        running += (f"; its keeper (imgembed db start, pid {state.keeper_lost}) was ended "
                    "before its time: the server stops after its last user exits "
                    "(`imgembed db stop` stops it now, `imgembed db start` keeps it up "
                    "again)")  # fmt: skip
    typer.echo(f"embedded PostgreSQL in {state.pgdata}: "
               f"{running if state.initialised else 'not created yet'}")  # fmt: skip


@db_app.command("stop")
def db_stop(
    force: Annotated[
        bool, typer.Option("--force", help="Stop it even while serve or index use it.")
    ] = False,
) -> None:
    """Stop the embedded server (it also stops by itself when its last user exits)."""
    from imgembed.store import embedded

    try:
        stopped = embedded.stop(make_settings().data_dir, force=force)
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    typer.echo("stopped" if stopped else "not running")
