"""The `imgembed` command line: parses arguments, calls the library, formats output.
Progress and summaries go to stderr, data to stdout or --output."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from imgembed.cli.common import (
    BatchOpt,
    DeviceOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    RuntimeOpt,
    SourcesArg,
    app,
    err,
    fail,
    make_service,
    optional_value,
    progress_bar,
    tables,
)
from imgembed.cli.output import Writer
from imgembed.errors import ImageError, ImgEmbedError, OutputError, error_dict
from imgembed.names import printable

if TYPE_CHECKING:  # imported where used: a search need not load NumPy or Pillow
    from imgembed.engine.pipeline import Progress
    from imgembed.results import ImageEmbeddingResult

OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output", "-o", help="out.jsonl | out.npy | out.parquet (default: JSONL on stdout)."
    ),
]


@app.command()
def embed(
    paths: SourcesArg,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
    batch_size: BatchOpt = None,
    output: OutputOpt = None,
    exact: Annotated[bool | None, typer.Option("--exact", help="No draft decoding.")] = None,
    cache: Annotated[
        bool | None, typer.Option("--cache/--no-cache", help="Use the embedding cache.")
    ] = None,
) -> None:
    """Embed images; exit 1 if any input failed (each failure is named on stderr)."""
    from imgembed.engine.pipeline import Progress
    from imgembed.intake.sources import expand_paths

    try:
        with Writer(output) as writer:  # an unwritable -o fails now, not after the work
            service = make_service(
                model=model,
                pretrained=pretrained,
                device=device,
                runtime=runtime,
                precision=precision,
                batch_size=batch_size,
                exact=exact,
                cache_embeddings=cache,
            )
            unlisted: list[ImageError] = []  # folders that cannot be listed
            files = expand_paths(paths, service.settings.supported_formats, unlisted)
            with err.status(f"loading {service.model_ref} ..."):
                service.encoder  # noqa: B018 - load before the clock starts
            started = time.perf_counter()
            failures, counts = [], Progress(total=len(files))
            with progress_bar() as bar:
                task = bar.add_task("embedding", total=len(files))

                def update(progress: Progress) -> None:
                    nonlocal counts
                    counts = progress
                    bar.update(task, completed=progress.done)

                for result in service.iter_images(files, update):
                    if result.error:
                        failures.append(result.error)
                    writer.write(_row(result))
            for error in unlisted:
                failures.append(error)
                writer.write({"source": error.source, **error_dict(error), "embedding": None})
            counts = dataclasses.replace(counts, failed=counts.failed + len(unlisted))
            # every input failed: a file from before is worth more than an empty one
            kept = bool(output and output.exists() and failures)
            kept = kept and not counts.embedded + counts.cached
            if kept:
                writer.discard()
            else:
                writer.close(service.dimension)
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    _summary(counts, time.perf_counter() - started, failures, None if kept else output)
    if kept and output:
        err.print(
            f"nothing embedded: {printable(str(output))} left as it was",
            highlight=False,
        )
    if failures:
        raise typer.Exit(1)


def _row(result: ImageEmbeddingResult) -> dict[str, Any]:
    row = result.to_dict()
    return {
        "source": result.image_path,
        "image_id": result.image_id,
        "model": result.model_name,
        "cached": result.cached,
        "error": row["error"],
        "error_type": row["error_type"],
        "embedding": result.embedding,
    }


def _summary(counts: Progress, seconds: float, failures: list[Any], output: Path | None) -> None:
    rate = (counts.embedded + counts.cached) / seconds if seconds > 0 else 0.0
    err.print(
        f"embedded: {counts.embedded}  cached: {counts.cached}  failed: {counts.failed}  "
        f"duration: {seconds:.2f} s  images/s: {rate:.1f}",
        highlight=False,
    )
    for failure in failures:
        err.print(f"  failed: {failure} ({type(failure).__name__})", highlight=False)
    if output:
        err.print(f"written to {printable(str(output))}", highlight=False)


@app.command("embed-text")
def embed_text(
    texts: Annotated[list[str], typer.Argument(help="Texts to embed; '-' reads lines from stdin.")],
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
    batch_size: BatchOpt = None,
    output: OutputOpt = None,
) -> None:
    """Embed texts into the same space as images."""
    if texts == ["-"]:
        texts = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    if not texts:  # nothing read is not "embedded: 0 texts"
        err.print("error: no text to embed (standard input held none)", highlight=False)
        raise typer.Exit(1)
    try:
        with Writer(output) as writer:  # an unwritable -o fails now, not after the work
            service = make_service(
                model=model,
                pretrained=pretrained,
                device=device,
                runtime=runtime,
                precision=precision,
                batch_size=batch_size,
            )
            started = time.perf_counter()
            vectors = service.embed_texts(texts)
            for text, vector in zip(texts, vectors, strict=True):
                writer.write({"source": text, "model": str(service.model_ref), "embedding": vector})
            writer.close(service.dimension)
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    seconds = time.perf_counter() - started
    err.print(f"embedded: {len(texts)} texts  duration: {seconds:.2f} s", highlight=False)
    if output:  # as embed says it
        err.print(f"written to {printable(str(output))}", highlight=False)


@app.command()
def metadata(
    paths: SourcesArg,
    extended: Annotated[
        bool, typer.Option("--extended", help="Camera, exposure, dates, orientation, GPS.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """Image metadata and the quality signal; exit 1 if any input failed."""
    from imgembed.intake.sources import expand_paths
    from imgembed.service import ImageEmbeddingService

    try:
        service = ImageEmbeddingService()  # no model is loaded for metadata
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    columns = ["path", "size", "format", "bytes", "quality"]
    table = Table(*columns, *(["taken", "camera", "GPS"] if extended else []))  # EXIF: asked
    table.columns[0].overflow = "fold"
    unlisted: list[ImageError] = []  # folders that cannot be listed
    files = expand_paths(paths, service.settings.supported_formats, unlisted)
    for error in unlisted:
        err.print(f"failed: {error} ({type(error).__name__})", highlight=False)
    failed = len(unlisted)
    for path in files:
        try:
            data = service.image_metadata(path, extended)
        except ImgEmbedError as exc:
            failed += 1
            err.print(f"failed: {exc} ({type(exc).__name__})", highlight=False)
            continue
        if as_json:
            typer.echo(json.dumps({"path": printable(str(path)), **data}, ensure_ascii=False))
        else:
            table.add_row(*_metadata_cells(path, data)[: len(table.columns)])
    if not as_json and table.row_count:
        tables().print(table)
    if failed:
        raise typer.Exit(1)


def _metadata_cells(path: Path | str, data: dict[str, Any]) -> list[str]:
    quality = data["quality"]
    camera = data.get("camera_info") or {}
    gps = data.get("gps_info") or {}
    flag = " low" if quality["low_quality"] else ""
    return [
        str(path),
        f"{data['width']}x{data['height']}",
        f"{data['format']} {data['mode']}",
        f"{data['size']:,}",
        f"{quality['confidence']:.2f}{flag}",
        data.get("creation_date") or "",
        " ".join(filter(None, [camera.get("make"), camera.get("model")])),
        f"{gps['latitude']:.5f}, {gps['longitude']:.5f}" if gps.get("latitude") is not None else "",
    ]


class _UserLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _library_log() -> None:
    """The library's warnings as the CLI's own lines ("warning: ..."), not in the raw
    "WARNING:imgembed.engine.cache:" form of the root handler open_clip sets up. `serve`
    replaces this with its JSON log."""
    handler = logging.StreamHandler()
    handler.setFormatter(_UserLines())
    logger = logging.getLogger("imgembed")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def main() -> None:
    from imgembed.cli import (  # noqa: F401 - register commands
        catalog_commands,
        model_commands,
        serve_command,
        store_commands,
    )

    # Decoders warn about oddities in files (skipped tags, huge images); every file already
    # ends embedded or with a typed error, so on a terminal these are noise.
    warnings.filterwarnings("ignore", module=r"PIL\.")  # DecompressionBombWarning too
    # and log about them (TIFF samples, EXIF); open_clip's root logging.info() call puts a
    # stderr handler on the root logger that would print those lines into the progress
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    # psycopg's "error ignored terminating <psycopg.Pipeline ...>" after a lost connection:
    # the typed error that follows says what happened and how to go on
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    _library_log()
    warnings.formatwarning = _warning  # ours are for users: the message, not our source line
    # SIGTERM (systemd, docker stop, kill) stops a command as Ctrl-C does: what was stored is
    # kept and the embedded PostgreSQL is let go at exit (by default nothing would clean up).
    signal.signal(signal.SIGTERM, _interrupt)
    sys.argv[1:] = optional_value(sys.argv[1:], "--ray", "local")
    try:
        try:
            app()
        finally:
            sys.stdout.flush()  # a full disk or closed pipe shows here, not at interpreter exit
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EDQUOT):
            raise
        # what was stored is kept; only what this command prints was lost
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if exc.errno == errno.EPIPE:  # the reader stopped (`| head`): quietly, as Click does
            sys.exit(1)
        sys.exit(fail(OutputError(f"cannot write the output: {exc.strerror or exc}")).exit_code)


def _warning(message: Warning | str, *args: object, **kwargs: object) -> str:
    return f"warning: {message}\n"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":  # python -m imgembed.cli.app, the module [project.scripts] names
    main()
