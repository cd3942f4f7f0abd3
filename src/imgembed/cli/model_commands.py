"""`imgembed models ...`: list the known models, export one to ONNX, verify a runtime."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from imgembed.cli.common import (
    PrecisionOpt,
    PretrainedOpt,
    RuntimeOpt,
    app,
    err,
    fail,
    make_service,
    tables,
)
from imgembed.errors import ConfigurationError, ImgEmbedError

models_app = typer.Typer(help="Known models; ONNX export and verification.", no_args_is_help=True)
app.add_typer(models_app, name="models")
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]
ModelArg = Annotated[str, typer.Argument(help="open_clip model name or seed alias.")]


@models_app.command("list")
def models_list(
    all_: Annotated[
        bool, typer.Option("--all", help="Every architecture + tag open_clip knows.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Known models, their embedding dimension and aliases."""
    from imgembed.models import registry

    if all_:
        rows = [
            {
                "model": ref.name,
                "pretrained": ref.pretrained,
                "dimension": dim,
                "note": "",
                "aliases": [],
            }
            for ref, dim in registry.known_pairs()
        ]
    else:
        rows = [
            {
                "model": e.ref.name,
                "pretrained": e.ref.pretrained,
                "dimension": e.dimension,
                "note": e.note,
                "aliases": list(e.aliases),
            }
            for e in registry.CATALOGUE
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("model", "pretrained", "dim", "aliases", "note")
    for row in rows:
        table.add_row(
            row["model"],
            row["pretrained"],
            str(row["dimension"]),
            ", ".join(row["aliases"]),
            row["note"],
        )
    tables().print(table)


@models_app.command("export")
def models_export(
    model: ModelArg,
    pretrained: PretrainedOpt = None,
    precision: Annotated[str, typer.Option(help="fp32 | int8 (dynamic quantisation).")] = "fp32",
    force: Annotated[bool, typer.Option("--force", help="Export even if up to date.")] = False,
) -> None:
    """Export a model's image and text towers to ONNX (needs torch; running them does not).
    The export is reused on later starts and redone when the weights change."""
    from imgembed.models import onnx_manifest

    try:
        service = make_service(
            model=model, pretrained=pretrained, runtime="onnx", precision=precision
        )
        ref, settings = service.model_ref, service.settings
        folder = onnx_manifest.export_dir(settings, ref, precision)
        reason = "--force" if force else onnx_manifest.stale_reason(folder, ref)
        if reason is None:
            err.print(f"up to date: {folder}", highlight=False)
        else:
            from imgembed.models.onnx_export import export

            with err.status(f"exporting {ref} ({precision}): {reason} ..."):
                export(ref, precision, settings)
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    manifest = onnx_manifest.read_manifest(folder) or {}
    for name, record in manifest.get("files", {}).items():
        err.print(
            f"  {name}  {record['bytes'] / 1e6:.1f} MB  sha256 {record['sha256'][:16]}",
            highlight=False,
        )
    typer.echo(str(folder))


@models_app.command("verify")
def models_verify(
    model: ModelArg,
    pretrained: PretrainedOpt = None,
    runtime: RuntimeOpt = "onnx",
    precision: PrecisionOpt = "int8",
    images: Annotated[
        Path | None, typer.Option("--images", help="A folder of your own images (recommended).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many images.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per encoder batch.")] = 8,
    min_cosine: Annotated[
        float | None,
        typer.Option(
            min=-1.0,
            max=1.0,
            help="Exit 1 below this image cosine (default 0.99 int8, 0.9999 else).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare a runtime + precision with open_clip on torch fp32: cosine (min / mean) over
    your images and prompts, and the speed ratio at the same batch size."""
    from imgembed.intake.sources import expand_paths
    from imgembed.models.verify import default_min_cosine, synthetic_images, verify

    try:
        service = make_service(
            model=model,
            pretrained=pretrained,
            runtime=runtime,
            precision=precision,
            batch_size=batch_size,
            device="cpu",
        )
        if images is None:
            err.print("no --images: using synthetic test images; your own photos say more")
            sources = synthetic_images(limit)
        else:
            unlisted: list[ImgEmbedError] = []  # a folder with no images, or none there
            found = expand_paths([str(images)], service.settings.supported_formats, unlisted)
            sources = found[:limit]
            if not sources and unlisted:
                raise ConfigurationError(f"--images: {unlisted[0]}")
        with err.status(f"verifying {service.model_ref} ({runtime} {precision}) ..."):
            report = verify(service.model_ref, service.settings, sources)
    except ImgEmbedError as exc:
        raise fail(exc) from exc
    bound = min_cosine if min_cosine is not None else default_min_cosine(report.precision)
    if as_json:
        typer.echo(json.dumps({**asdict(report), "speed_ratio": report.speed_ratio}, indent=2))
    else:
        table = Table("", f"{runtime} {precision}", "torch fp32 (reference)")
        table.add_row("images", str(report.images), "")
        table.add_row(
            "image cosine min / mean",
            f"{report.image_cosine_min:.6f} / {report.image_cosine_mean:.6f}",
            "1 / 1",
        )
        if report.text_cosine_min is not None:
            table.add_row(
                "text cosine min / mean",
                f"{report.text_cosine_min:.6f} / {report.text_cosine_mean:.6f}",
                "1 / 1",
            )
        table.add_row(
            f"images/s (batch {report.batch_size})",
            f"{report.images_per_second:.1f} ({report.speed_ratio:.2f}x)",
            f"{report.reference_images_per_second:.1f}",
        )
        tables().print(table)
    for failure in report.failed:
        err.print(f"  skipped: {failure}", highlight=False)
    if report.image_cosine_min < bound:
        err.print(f"image cosine {report.image_cosine_min:.6f} is below {bound}", highlight=False)
        raise typer.Exit(1)
